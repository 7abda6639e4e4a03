#!/usr/bin/env bash
# The GPU figures of issues 39 (speed, memory), 40 (SDXL) and 41 (FLUX) for a session lent a device machine,
# run from the repository root (device tool: carry [".wheels"]). A session has 15 minutes of device time in all,
# the machine's start (a minute or two) included, at most 10 minutes a command, and the machine stays warm only
# 30 s after a call. So two calls at most, the second at once:
#
#     bash benchmarks/device_session.sh main sd1     # ~9 min: issue 39 (main job; sampling ratio, s/step, SFD peak)
#     bash benchmarks/device_session.sh sdxl         # ~4 min, if that much is left: issue 40
#
# and in a later session: `flux gan` (FLUX wants nvidia-h200: its float32 load is ~68 GB before the frozen weights
# are halved), `graphs compile bank` (the main job in CUDA graphs, the attack's UNet call compiled, the bank's batch).
#
# The device machine has torch, transformers and accelerate but not the rest, and no network: fetch their wheels
# here once, into the ignored folder .wheels (never into the repository root):
#
#     pip download --no-deps -d .wheels diffusers==0.42.1 peft==0.21.2 open_clip_torch==3.3.0 ftfy wcwidth \
#         importlib_metadata
#
# Each part is time-boxed; its JSON goes to $OUT/PART.json (what it printed before a cut-off included), its log to
# $OUT/PART.log, and one line per part to $OUT/parts.jsonl (exit status 124: cut off by its box). With
# DEVICE_SESSION_TINY=1 every part runs on toy components on the CPU in seconds: the check of this script.
set -u
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
if [ -n "${DEVICE_SESSION_TINY:-}" ]; then
    scale=(--tiny --device cpu) main=(--seeds 1 --set steps=2 --set warmup=1) bank=(--set bank_size=2) box=600
    graphs=aot_eager choices=none,aot_eager  # what the CPU can trace of them
else
    scale=() main=() bank=() box=0 graphs=cudagraphs choices=none,cudagraphs,reduce-overhead,inductor
    # Into a folder of their own, without an index (there is none), and the project from its source tree: an
    # editable install would fetch setuptools for its isolated build.
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .wheels/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}

part() {  # part NAME SECONDS COMMAND...: run COMMAND for at most SECONDS (or $box where set)
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    timeout "$((box > 0 ? box : limit))" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
    local status=$?
    echo "{\"part\": \"$name\", \"exit\": $status, \"seconds\": $((SECONDS - started))}" | tee -a "$OUT/parts.jsonl"
}

sd1_methods=esd,advunlearn,fewshot,sfd+lora_rank=8,sfd+gradient_checkpointing=true
if python -c "import bitsandbytes" 2> /dev/null; then
    sd1_methods=$sd1_methods,sfd+gradient_checkpointing=true+optimizer_state=8bit
fi
for name in "$@"; do
    case $name in
        # fp16 sampling at batch 16 and 25 steps against plain diffusers; each method's s/step and peak memory
        sd1) part sd1 330 python benchmarks/gpu_scale.py --family sd1 --methods "$sd1_methods" --batch 16 "${scale[@]}" ;;
        # the README's main job (its erase_time_s) and its quality, to set beside the CPU's
        main) part main 180 python benchmarks/erasure_quality.py --method advunlearn --concept seven "${main[@]}" ;;
        # the same with the step's UNet calls replayed as CUDA graphs (erasure.json: advunlearn.compile_unet says
        # whether any graph fell back to eager launches)
        graphs) part graphs 150 python benchmarks/erasure_quality.py --method advunlearn --concept seven \
            --set compile_unet=$graphs "${main[@]}" ;;
        # the attack's UNet call eager, in CUDA graphs, fused into CUDA graphs and fused: first call and per call
        compile) part compile 240 python benchmarks/compile_speed.py --choices $choices ;;
        # the main job's bank one entry at a time and at the GPU default (all 32 entries per UNet call)
        bank) part bank 90 python benchmarks/bank_speed.py --batches 1,0 "${bank[@]}" ;;
        sdxl) part sdxl 240 python benchmarks/gpu_scale.py --family sdxl --methods esd,advunlearn --steps 4 --batch 8 \
            "${scale[@]}" ;;
        flux) part flux 240 python benchmarks/gpu_scale.py --family flux --methods esd --steps 4 --batch 2 \
            --sample-steps 28 "${scale[@]}" ;;
        gan) part gan 180 python benchmarks/gan_scale.py --size 256 --steps 2 \
            --methods adapt-unlearn,adapt-unlearn+micro_batch=4 "${scale[@]}" ;;
        *) echo "unknown part $name (sd1, main, graphs, compile, bank, sdxl, flux, gan)" >&2; exit 2 ;;
    esac
done
echo "figures in $OUT"

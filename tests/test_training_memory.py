"""Training's memory levers: Adam's moments in 8 bits (`--optimizer-state 8bit`, bitsandbytes) and the frozen
networks in the mixed precision's dtype (`--frozen-precision half`). Both change the result a little and are
therefore part of what a checkpoint resumes under; neither is on by default on the CPU, where every preset's
result was measured. The 8-bit tests run where the `adam8bit` extra is installed (not in `dev`: see
pyproject.toml); without it, the option is refused in one line."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from erasure.api import erase
from erasure.config import build_config, parse_sets
from erasure.registry import METHODS, get_method
from erasure.training import RunContext
from pipelines import InputError, load_model

from .conftest import stops_resumably

ESD_FULL = ["steps=4", "ddim_steps=3", "batch_size=1", "lr=1e-3", "scope=full"]
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
needs_bitsandbytes = pytest.mark.skipif(not HAS_BITSANDBYTES, reason="the adam8bit extra (bitsandbytes)")


def _sets(method: str, *extra: str) -> list[str]:
    return [f"{k}={v}" for k, v in METHODS[method].test_settings.items()] + list(extra)


def test_frozen_precision_is_half_only_when_asked_or_on_a_gpu_under_mixed_precision():
    assert RunContext(progress=False).frozen_dtype is torch.float32
    assert RunContext(mixed_precision="bf16", progress=False).frozen_dtype is torch.float32  # auto, on the CPU
    assert RunContext(mixed_precision="bf16", frozen_precision="half", progress=False).frozen_dtype is torch.bfloat16
    with pytest.raises(InputError, match="add --mixed-precision bf16"):
        RunContext(frozen_precision="half")
    with pytest.raises(InputError, match="--frozen-precision must be auto, full, half, not 'bf16'"):
        RunContext(frozen_precision="bf16")
    with pytest.raises(InputError, match="--optimizer-state must be fp32 or 8bit, not '4bit'"):
        RunContext(optimizer_state="4bit")


@pytest.mark.skipif(HAS_BITSANDBYTES, reason="bitsandbytes is installed")
def test_8bit_adam_without_bitsandbytes_is_refused_with_the_extra_to_install(tiny_pipeline_dir, tmp_path):
    with pytest.raises(InputError, match=r"needs bitsandbytes: pip install -e \"\.\[adam8bit\]\""):
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "a", sets=ESD_FULL, optimizer_state="8bit")
    assert not (tmp_path / "a").exists() and not (tmp_path / ".a.work").exists()


@needs_bitsandbytes
def test_8bit_adam_keeps_a_byte_per_moment_for_large_tensors_and_32_bits_for_small_ones():
    large, small = torch.nn.Parameter(torch.randn(128, 64)), torch.nn.Parameter(torch.randn(8))
    optimizer = RunContext(optimizer_state="8bit", progress=False).adam([large, small], 1e-3)
    before = large.detach().clone()
    large.grad, small.grad = torch.randn_like(large), torch.randn_like(small)
    optimizer.step()
    assert optimizer.state[large]["state1"].dtype == torch.uint8 == optimizer.state[large]["state2"].dtype
    assert optimizer.state[small]["state1"].dtype == torch.float32
    # Adam's first step moves every weight by about lr, whatever its gradient's size
    assert torch.allclose((large - before).abs().mean(), torch.tensor(1e-3), rtol=0.05)
    assert isinstance(RunContext(progress=False).adam([small], 1e-3), torch.optim.Adam)


@needs_bitsandbytes
def test_an_8bit_adam_run_resumes_bit_identical_and_records_its_optimiser(tiny_pipeline_dir, tmp_path):
    kwargs = dict(sets=ESD_FULL, checkpoint_every=2, progress=False, optimizer_state="8bit")
    straight = erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "a", **kwargs)
    with stops_resumably():
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "b", after_step=_stop_at(3), **kwargs)
    saved = torch.load(tmp_path / ".b.work" / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert any(m.dtype == torch.uint8 for m in _tensors(saved["optimizers"]["unet"]["state"]))
    with pytest.raises(InputError, match="made with other values of: optimizer_state"):
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "b", sets=ESD_FULL, resume=True, progress=False)
    resumed = erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "b", resume=True, **kwargs)
    assert json.loads((resumed / "erasure.json").read_text())["optimizer_state"] == "8bit"
    a, b = load_model(str(straight)).unet.state_dict(), load_model(str(resumed)).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    full = load_model(str(erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "c", sets=ESD_FULL,
                                progress=False))).unet.state_dict()  # fmt: skip
    base = load_model(str(tiny_pipeline_dir)).unet.state_dict()
    moved_8bit = torch.cat([(a[k] - base[k]).flatten() for k in a])
    moved_full = torch.cat([(full[k] - base[k]).flatten() for k in a])
    # the same steps, Adam's moments rounded to a byte: the weights move the same way, not to the same bits
    assert not torch.equal(moved_8bit, moved_full)
    assert torch.nn.functional.cosine_similarity(moved_8bit, moved_full, dim=0) > 0.9


def _tensors(state) -> list[torch.Tensor]:
    if torch.is_tensor(state):
        return [state]
    return [t for value in state.values() for t in _tensors(value)] if isinstance(state, dict) else []


def _stop_at(step_to_fail: int):
    def after_step(step, total, logs):
        if step == step_to_fail:
            raise KeyboardInterrupt

    return after_step


def _trained(method: str, folder, sets: list[str], frozen_precision: str):
    model = load_model(str(folder))
    unet = {k: v.clone() for k, v in model.unet.state_dict().items()}
    run = RunContext(seed=0, progress=False, mixed_precision="bf16", frozen_precision=frozen_precision)
    result = get_method(method).entry(model, ["cat"], build_config(method, "sd1", parse_sets(sets)), run)
    return model, unet, result


@pytest.mark.parametrize("method", ["advunlearn", "fewshot"])
def test_a_half_precision_frozen_unet_trains_the_encoder_and_comes_back_as_it_was(
    method, tiny_pipeline_dir, concept_images
):
    sets = _sets(method, *(["images=" + str(concept_images), "stop_below=none"] if method == "fewshot" else []))
    base = load_model(str(tiny_pipeline_dir)).text_encoder.state_dict()
    moved = {}
    for precision in ("full", "half"):
        model, unet_before, result = _trained(method, tiny_pipeline_dir, sets, precision)
        # the UNet the run returns (and a single-file base's run saves) is the float32 one it was given
        assert all(p.dtype == torch.float32 for p in model.unet.parameters())
        assert all(torch.equal(v, unet_before[k]) for k, v in model.unet.state_dict().items())
        assert all(p.dtype == torch.float32 for p in model.text_encoder.parameters())
        encoder = model.text_encoder.state_dict()
        moved[precision] = torch.cat([(encoder[k] - base[k]).flatten() for k in base])
    assert moved["half"].abs().max() > 0 and not torch.equal(moved["half"], moved["full"])
    assert torch.nn.functional.cosine_similarity(moved["half"], moved["full"], dim=0) > 0.9


def test_esd_with_a_half_precision_original_moves_its_weights_as_with_a_float32_one(tiny_pipeline_dir, monkeypatch):
    halved = []
    halve = RunContext.halve_frozen
    monkeypatch.setattr(RunContext, "halve_frozen", lambda run, m: halved.append(halve(run, m)) or m)
    base = load_model(str(tiny_pipeline_dir)).unet.state_dict()
    moved = {}
    for precision in ("full", "half"):
        model, _, _ = _trained("esd", tiny_pipeline_dir, ESD_FULL, precision)
        unet = model.unet.state_dict()
        assert all(v.dtype == torch.float32 for v in unet.values())
        moved[precision] = torch.cat([(unet[k] - base[k]).flatten() for k in base])
    # the original was a bfloat16 copy in the second run, not the trained UNet
    assert [{p.dtype for p in m.parameters()} for m in halved] == [{torch.float32}, {torch.bfloat16}]
    assert halved[1] is not model.unet
    # Autocast rounds a float32 original's convolution and matmul weights to bfloat16 at every call: stored so,
    # they compute the same thing (the norms', in float32 there, are 1 and 0 in this untrained UNet).
    assert moved["full"].abs().max() > 0
    assert torch.allclose(moved["half"], moved["full"], rtol=0.05, atol=1e-6)


def test_esd_lora_computes_through_a_half_precision_base_and_returns_it_in_float32(tiny_pipeline_dir):
    model = load_model(str(tiny_pipeline_dir))
    unet_before, encoder_before = (
        {k: v.clone() for k, v in module.state_dict().items()} for module in (model.unet, model.text_encoder)
    )
    seen = []

    def after_step(step, total, logs):  # the dtypes the loop computes through
        seen.append({".lora_" in name: p.dtype for name, p in model.unet.named_parameters()}
                    | {"encoder": next(model.text_encoder.parameters()).dtype})  # fmt: skip

    run = RunContext(seed=0, progress=False, mixed_precision="bf16", frozen_precision="half", after_step=after_step)
    get_method("esd").entry(model, ["cat"], build_config("esd", "sd1", parse_sets(ESD_FULL + ["lora_rank=4"])), run)
    # under the adapters the base was bfloat16, and so was the frozen text encoder; the adapters trained in float32
    assert seen and all(s == {False: torch.bfloat16, True: torch.float32, "encoder": torch.bfloat16} for s in seen)
    # the run returns the base's own float32 weights (a LoRA run merges its adapters into them), adapters moved
    unet = model.unet.state_dict()
    base = {k.replace("base_layer.", ""): v for k, v in unet.items() if ".lora_" not in k}
    assert base.keys() == unet_before.keys() and all(torch.equal(base[k], v) for k, v in unet_before.items())
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.text_encoder.state_dict().items())
    assert {p.dtype for p in model.unet.parameters()} | {p.dtype for p in model.text_encoder.parameters()} == {
        torch.float32
    }
    assert any(v.abs().max() > 0 for k, v in unet.items() if "lora_B" in k)


@pytest.mark.parametrize("lora", [False, True])
def test_sfd_with_a_half_precision_teacher_trains_a_float32_generator(lora, tiny_pipeline_dir, tmp_path):
    sets = _sets("sfd", "override=a dog", *(["lora_rank=4"] if lora else []))
    state = "8bit" if HAS_BITSANDBYTES else "fp32"  # 8-bit Adam too where the adam8bit extra is installed
    out = erase("sfd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=sets, progress=False,
                mixed_precision="bf16", frozen_precision="half", optimizer_state=state,
                save="lora" if lora else "full")  # fmt: skip
    manifest = json.loads((out / "erasure.json").read_text())
    assert manifest["frozen_dtype"] == "bfloat16" and manifest["optimizer_state"] == state
    if lora:  # the adapters trained in float32 on the half-precision bases
        from safetensors.torch import load_file

        adapters = load_file(out / "pytorch_lora_weights.safetensors")
        assert adapters and {t.dtype for t in adapters.values()} == {torch.float32}
    generator = load_model(str(out)).unet
    base = load_model(str(tiny_pipeline_dir)).unet.state_dict()
    weights = generator.state_dict()
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(weights[k], base[k]) for k in base)

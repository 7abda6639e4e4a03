"""The `erasure` command line: an app on the library (erasure, evaluators, pipelines), like the preview.

Heavy libraries (torch, diffusers, gradio) are imported inside the subcommands, so `erasure --help`
and `erasure methods` answer at once. Bad input ends with one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from erasure import DISTRIBUTION, __version__
from erasure.config import FROZEN_PRECISIONS, MIXED_PRECISIONS, OPTIMIZER_STATES
from erasure.evaluation import ATTACKS
from erasure.registry import METHODS, preset_paper
from pipelines.bounds import COUNT, GUIDANCE, LORA_STRENGTH, STEPS, TRUNCATION, number, seed
from pipelines.components import RUN_SAVE_MODES
from pipelines.devices import DTYPES
from pipelines.errors import InputError
from pipelines.lora_files import LORA_FORMATS, MAX_LORA_RANK

DESCRIPTION = """\
Erase a concept (object, style, attribute, nudity, identity) from a text-to-image diffusion
model or a GAN, look at it before/after, measure it, publish it.

Every command works offline on the embedded digits world (the default model: `digits`, or `digits-gan` for the
GAN methods).
"""

CONFIRM_IMAGES = 1024  # `sample` asks for --yes above this many images

EPILOG = """\
examples:
  erasure erase --method esd --concept seven --out runs/esd-seven
  erasure sample runs/esd-seven --prompt "a red seven" --n 8 --out grid.png
  erasure eval runs/esd-seven
  erasure compare runs/esd-seven runs/adv-seven --out table.md
  erasure export runs/esd-seven --repo-id me/digits-no-seven --local-dir hub/digits-no-seven
  erasure methods
"""


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto, the GPU when there is one)"
    )
    p.add_argument(
        "--model-config", metavar="DIR", type=given,
        help="for a single-file checkpoint: a diffusers folder with its component configs (built in: SD 1.x, 768-px "
             "SD 2.x, SDXL base)",
    )  # fmt: skip


def _add_dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype", default="auto", choices=DTYPES,
        help="weights' precision for generating: auto (default) is fp16 on a GPU and fp32 on the CPU",
    )  # fmt: skip


def given(text: str) -> str:
    """An argparse `type=` for a path or name whose absence means a default: given empty (`--config "$UNSET"`), it
    would be taken as not given and the default used without a word, so it is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty")
    return text


class Parser(argparse.ArgumentParser):
    """No abbreviated options (`sample --model X` must not silently mean `--model-config X`), and a bad
    command line ends like any other bad input: one `error:` line, exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and getattr(namespace, "_refused_by", None) is None:
            # argparse refuses a command's unknown option at the top, so the error would point at `erasure --help`
            # rather than at `erasure zoo list --help`, whose options the user was reaching for. The innermost
            # parser returns first, so it is the one recorded.
            namespace._refused_by = self
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            getattr(namespace, "_refused_by", self).error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="erasure", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} ({DISTRIBUTION})")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the toolkit does (loading, saving)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_erase_command(sub)
    _add_eval_command(sub)
    _add_compare_command(sub)
    _add_sample_command(sub)
    _add_preview_command(sub)
    _add_export_command(sub)
    _add_methods_command(sub)
    _add_zoo_command(sub)
    return parser


def _add_erase_command(sub) -> None:
    p = sub.add_parser(
        "erase", help="erase a concept from a model and save the erased model",
        description="Erase CONCEPT from MODEL with METHOD. The run folder is written atomically: a model folder "
        "every erasure command loads (a text-to-image run saved in full is a diffusers pipeline) plus erasure.json "
        "with everything that produced it.",
    )  # fmt: skip
    p.add_argument("--method", choices=list(METHODS), help="erasure method (see `erasure methods`)")
    p.add_argument("--model", default=None, help="model to erase from (default: the embedded "
                   "`digits`, or `digits-gan` for a GAN method)")
    p.add_argument("--concept", action="append", help="concept to erase; repeat for several")
    p.add_argument(
        "--config", metavar="FILE", type=given,
        help="YAML file of method options (`--show-config > FILE` writes one), or a finished run's erasure.json (or "
        "its folder): then its method, concepts, base model, seed and options are the defaults, and the run is "
        "reproduced",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="set one method option (repeatable); a list is a,b,c or, when an item holds a comma, a YAML list "
        "such as \"prompt_templates=['a photo of {}, in a museum', '{}']\"",
    )  # fmt: skip
    p.add_argument(
        "--images", metavar="DIR|builtin",
        help="a folder of a few images of the concept, for methods that learn from images (fewshot); "
        "the same as --set images=DIR",
    )  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="run folder to create (default: runs/<method>-<concept>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--seed", type=seed, default=None, help="random seed (default: 0)")
    p.add_argument("--mixed-precision", default=None, choices=MIXED_PRECISIONS, help="accelerate mixed precision")
    p.add_argument(
        "--optimizer-state", default=None, choices=OPTIMIZER_STATES,
        help="Adam's moment estimates: fp32 (default; torch's Adam, fused on a GPU) or 8bit (bitsandbytes' "
        "blockwise 8-bit Adam, from the adam8bit extra: a quarter of the optimiser memory, e.g. for full-weight SFD "
        "at SD 1.x size)",
    )  # fmt: skip
    p.add_argument(
        "--frozen-precision", default=None, choices=FROZEN_PRECISIONS,
        help="weights of the networks a method computes through but does not train (ESD's original, SFD's teacher, "
        "the UNet of advunlearn and fewshot): half keeps them in the --mixed-precision dtype; auto (default) is half "
        "on a GPU under --mixed-precision, full (float32) otherwise",
    )  # fmt: skip
    p.add_argument(
        "--save", default="full", choices=RUN_SAVE_MODES,
        help="full: a complete pipeline folder, unchanged components linked or copied from the base byte for "
        "byte (default); changed: only the changed components and a reference to the base (by path or hub id "
        "and sha256), which every erasure command resolves; lora: a run trained with --set lora_rank=R kept as its "
        "diffusers LoRA file alone (pytorch_lora_weights.safetensors) and that reference",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every",
        type=number(int, COUNT),
        default=50,
        metavar="N",
        help="checkpoint every N steps (default: 50)",
    )
    p.add_argument(
        "--show-config", action="store_true",
        help="print the method's options for --model (with --config/--set applied) as YAML that --config reads back, "
        "then exit",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_options(p)
    p.set_defaults(func=cmd_erase)


def _add_eval_command(sub) -> None:
    p = sub.add_parser("eval", help="measure an erased model against its base (writes eval.json and grids)")
    p.add_argument("target", metavar="DIR_OR_MODEL", help="an erased run folder, or any model with --baseline")
    p.add_argument("--concept", action="append", help="concept to measure (default: the run's concepts)")
    p.add_argument("--baseline", type=given, help="model to compare with (default: the run's base model)")
    p.add_argument("--json", metavar="FILE", type=given, help="where to write the report (default: DIR/eval.json, "
                   "grids in DIR/grids/; a model that is no run: ./eval-CONCEPTS.json; elsewhere, grids in "
                   "FILE-STEM-grids/ beside it)")  # fmt: skip
    p.add_argument("--samples", type=number(int, COUNT), default=None, metavar="N",
                   help="seeds per prompt (default: 20 on digits models, 10 on others); a GAN run: latent samples "
                        "(default: 1000)")  # fmt: skip
    p.add_argument("--seed", type=seed, default=0, help="first seed (default: 0)")
    p.add_argument(
        "--clip",
        help="CLIP model for scoring (default: digits-clip for digits models, "
        "openai/clip-vit-large-patch14 otherwise; or open_clip:<name>:<weights>)",
    )
    p.add_argument(
        "--fid-features",
        metavar="judge|clip|inception:FILE",
        help="features for FID/KID (default: judge in the digits world, clip otherwise)",
    )
    p.add_argument(
        "--prompts", metavar="FILE", type=given,
        help="target prompts: a CSV with a `prompt` column and optional `seed`/`evaluation_seed`/`sd_seed` and "
        "`guidance`/`evaluation_guidance`/`sd_guidance_scale` columns (the I2P layout; a row with a seed is drawn "
        "once, with it), or a text file of one prompt per line (drawn with every seed)",
    )  # fmt: skip
    p.add_argument("--preserved-prompts", metavar="FILE", type=given,
                   help="preserved prompts, in the same formats as --prompts")  # fmt: skip
    p.add_argument("--neighbours", nargs="+", metavar="TEXT", help="neighbour concepts added to the preserved prompts")
    p.add_argument(
        "--attack", choices=ATTACKS, action="append",
        help="also attack the erased model (no retraining; repeat for several, each on the same pairs): "
        "embedding = UnlearnDiffAtk relaxed to embedding space; "
        "unlearndiffatk = its discrete form, k prefix words a user could type (saved as text); textual-inversion = "
        "a new word learnt on the erased model from images of the concept (Pham et al., ICLR 2024). eval.json gets the "
        "attack success rate and every (prompt, seed) pair's outcome",
    )  # fmt: skip
    p.add_argument(
        "--attack-images", metavar="DIR", type=given,
        help="textual-inversion: images of the concept to learn the word from (default: the base model's)",
    )  # fmt: skip
    p.add_argument(
        "--attack-prompts", type=number(int, COUNT), metavar="N",
        help="target prompts to attack, the first N of --prompts (each at its rows' seeds and guidance, where they "
        "give them) or of the built-in ones (default: all)",
    )
    p.add_argument(
        "--attack-seeds", type=number(int, COUNT), metavar="K",
        help="seeds per prompt, from 1000 (default: 5); a --prompts row with a seed is attacked at that one"
    )
    p.add_argument(
        "--attack-steps", type=number(int, COUNT), metavar="S", help="attack steps (default: 100)"
    )
    p.add_argument("--resume", action="store_true",
                   help="keep the attacks an interrupted evaluation with the same settings finished (each is saved "
                        "beside the report, in STEM.partial.json, as it ends), and run only the others")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_options(p)
    _add_dtype_option(p)
    p.set_defaults(func=cmd_eval)


def _add_compare_command(sub) -> None:
    p = sub.add_parser(
        "compare", help="several evaluations side by side: one table, a column per erased model",
        description="Put the eval.json of several runs (or any reports `erasure eval --json` wrote) side by side: "
        "a row per metric and attack, the base model's value, then each erased model's. The reports must share the "
        "base model and the protocol (seeds, steps, guidance, CLIP, judge, prompts); each attack gets rows of "
        "its own. Prints Markdown; --out FILE.md or FILE.csv also writes it (CSV: full-precision numbers).",
    )  # fmt: skip
    p.add_argument("reports", nargs="+", metavar="RUN_OR_REPORT", help="a run folder (its eval.json) or a report file")
    p.add_argument("--out", metavar="FILE.md|FILE.csv", help="also write the table to this file")
    p.set_defaults(func=cmd_compare)


def _add_sample_command(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate images from any model (pipeline folder, run folder, embedded name)",
        description="Generate N images per prompt with seeds S..S+N-1. --out *.png (or .jpg, .webp) writes one "
        "labelled grid (rows: prompts, columns: seeds; GANs: rows of 8 seeds); any other --out is a folder of "
        "p{prompt}_s{seed}.png files (s{seed}.png for GANs).",
    )  # fmt: skip
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help="model or run folder (default: digits)")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable; GANs take none)")
    p.add_argument(
        "--n", type=number(int, COUNT), default=4,
        help=f"images per prompt (default: 4; more than {CONFIRM_IMAGES} images in all need --yes)",
    )  # fmt: skip
    p.add_argument("--yes", action="store_true", help="confirm a large --n")
    p.add_argument("--seed", type=seed, default=0, help="first seed (default: 0)")
    p.add_argument("--out", required=True, metavar="GRID.png|DIR", help="grid image or output folder")
    p.add_argument("--steps", type=number(int, STEPS), help=f"sampling steps, {STEPS} (default: the model's)")
    p.add_argument("--guidance", type=number(float, GUIDANCE), help="classifier-free guidance (default: the model's)")
    p.add_argument(
        "--truncation", type=number(float, TRUNCATION),
        help=f"GAN truncation psi, {TRUNCATION} (default: 1.0)",
    )  # fmt: skip
    p.add_argument(
        "--lora-strength", type=number(float, LORA_STRENGTH), metavar="W",
        help=f"a run trained as LoRA (--set lora_rank=R) drawn with its erasure at weight W, {LORA_STRENGTH}: its "
        "base model with the adapters at that weight (0: the erasure off; default: the run as trained)",
    )  # fmt: skip
    _add_model_options(p)
    _add_dtype_option(p)
    p.set_defaults(func=cmd_sample)


def _add_preview_command(sub) -> None:
    p = sub.add_parser(
        "preview", help="Gradio app: before/after on the same seeds, erase with progress, metrics, export",
        description="Serve the preview page: the base model and erased runs side by side on the same seeds, "
        "an Erase tab with live progress and cancel, each run's metrics, and export. With no arguments it "
        "lists the finished runs under ./runs/ and opens on the newest beside its base (digits-sd when there is "
        "none).",
    )  # fmt: skip
    p.add_argument("--model", default=None, help="base model to compare against (default: the selected run's own "
                   "base, else digits)")
    p.add_argument("--erased", action="append", default=[], metavar="DIR", help="erased run folder to compare "
                   "(repeatable; default: the newest run under ./runs/)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=number(int, "[1, 65535]"), default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by "
                   "default); a shared page has no Export and loads only the embedded models, --model and the listed "
                   "runs")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N for generating and erasing "
                   "(default: auto, the GPU when there is one)")  # fmt: skip
    _add_dtype_option(p)
    p.set_defaults(func=cmd_preview)


def _add_export_command(sub) -> None:
    p = sub.add_parser(
        "export", help="publish a run to the Hugging Face Hub with a model card",
        description="Build the Hub folder of a run (the model in safetensors, erasure.json, eval.json and its "
        "grids, a model card README.md) and push it with create_repo + upload_folder; the token comes from "
        "HF_TOKEN or the stored login. With --local-dir, write the folder there and push nothing.",
    )  # fmt: skip
    p.add_argument("run", metavar="DIR", help="erased run folder")
    p.add_argument("--repo-id", required=True, help="Hub repository, e.g. org/sd14-no-nudity (also named in the card)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--local-dir", metavar="DIR", type=given,
                   help="write the Hub folder here (a new folder) and push nothing")  # fmt: skip
    p.add_argument(
        "--no-eval", action="store_true",
        help="export without an evaluation (needed when the run has no eval.json); the card says it was not evaluated",
    )  # fmt: skip
    p.add_argument(
        "--single-file", action="store_true",
        help="also write the model as one original-layout .safetensors (SD 1.x, 2.x or SDXL; A1111 / ComfyUI)",
    )  # fmt: skip
    p.add_argument(
        "--as-lora", type=number(int, f"[1, {MAX_LORA_RANK}]"), metavar="RANK",
        help=f"also write the run's weight change as LoRA adapters of this rank, 1-{MAX_LORA_RANK} (SVD; "
        "pytorch_lora_weights.safetensors, loaded by diffusers' load_lora_weights), and the reduction's error "
        "(lora_reduction.json)",
    )  # fmt: skip
    p.add_argument(
        "--lora-format", choices=LORA_FORMATS, default="diffusers",
        help="kohya: also write the LoRA (the run's own, or --as-lora's) in the kohya / sd-scripts layout that "
        "A1111 and ComfyUI load (FLUX: sd-scripts' FLUX layout of the blocks' layers, for ComfyUI), as "
        "REPO-NAME-lora.safetensors (default: the diffusers file only)",
    )  # fmt: skip
    p.set_defaults(func=cmd_export)


def _add_methods_command(sub) -> None:
    p = sub.add_parser("methods", help="list the erasure methods and their papers")
    p.set_defaults(func=cmd_methods)


def _add_zoo_command(sub) -> None:
    p = sub.add_parser("zoo", help="the embedded digits-world models: list them or rebuild them")
    zoo_sub = p.add_subparsers(dest="zoo_command", metavar="list|build", required=True)
    z = zoo_sub.add_parser("list", help="show the embedded models and their measured quality")
    z.set_defaults(func=cmd_zoo_list)
    z = zoo_sub.add_parser(
        "build",
        help="retrain the embedded models from the recipe (hours on 2 cores: digits-gan alone "
        "takes about 6, in three stages that resume from snapshots)",
    )
    z.add_argument("--out", required=True, metavar="DIR", help="folder to build into (use it with ERASURE_ZOO=DIR)")
    z.add_argument("--seed", type=seed, default=0)
    z.add_argument("--only", action="append", default=[], metavar="NAME", help="build only this model (repeatable)")
    z.add_argument(
        "--scale",
        type=number(float, "(0, inf)"),
        default=1.0,
        help="fraction of the recipe's steps (smoke runs)",
    )
    z.set_defaults(func=cmd_zoo_build)


# --- subcommands --------------------------------------------------------------------------------


def cmd_erase(args: argparse.Namespace) -> int:
    from erasure.api import erase
    from erasure.config import load_config_file

    recorded = load_config_file(args.config)[1] if args.config else None
    if recorded is not None:  # a finished run's erasure.json: its settings are the defaults
        from erasure.output import recorded_base_model

        args.method = args.method or recorded["method"]
        args.concept = args.concept or recorded["concepts"]
        args.model = args.model or recorded_base_model(recorded)
        args.seed = recorded.get("seed", 0) if args.seed is None else args.seed
        args.mixed_precision = args.mixed_precision or recorded.get("mixed_precision")
        args.optimizer_state = args.optimizer_state or recorded.get("optimizer_state")
        args.frozen_precision = args.frozen_precision or recorded.get("frozen_precision")
    if args.method is None:
        raise InputError(f"--method is needed; choose one of: {', '.join(METHODS)}")
    if args.images is not None:
        import dataclasses

        from erasure.registry import get_method

        learners = [m.key for m in METHODS.values() if "images" in {f.name for f in dataclasses.fields(m.config)}]
        if get_method(args.method).key not in learners:
            raise InputError(f"{args.method} learns from no images; --images is for {', '.join(learners)}")
    sets = ([f"images={args.images}"] if args.images is not None else []) + args.set
    if args.show_config:
        return _show_config(args.method, args.model, args.config, sets)
    if not args.concept:
        raise InputError("--concept is needed (repeat it for several concepts)")
    out = erase(
        args.method, args.concept, args.model, out=args.out, config_file=args.config, sets=sets,
        seed=0 if args.seed is None else args.seed, device=args.device, mixed_precision=args.mixed_precision or "no",
        optimizer_state=args.optimizer_state or "fp32", frozen_precision=args.frozen_precision or "auto",
        resume=args.resume, checkpoint_every=args.checkpoint_every, progress=not args.quiet,
        model_config=args.model_config, save=args.save,
    )  # fmt: skip
    if _is_main_process():  # under several processes, one line
        print(f"erased {', '.join(args.concept)} with {args.method}: {out}")
    return 0


def _is_main_process() -> bool:
    """Under `torchrun` or `accelerate launch` every process runs the command, and the first one reports. Read from
    the launcher's RANK: accelerate's state was the run's, and `erase` and `evaluate` leave it as they found it."""
    return int(os.environ.get("RANK", "0")) == 0


def _show_config(method: str, model: str | None, config_file: str | None, sets: list[str]) -> int:
    from erasure.api import check_method_takes
    from erasure.config import build_config, config_yaml, load_config_file, parse_sets
    from erasure.registry import default_model, get_method
    from pipelines import resolve

    source = resolve(default_model(method) if model is None else model)
    check_method_takes(get_method(method), source)
    family = source.family
    layers = [load_config_file(config_file)[0]] if config_file else []
    config = build_config(method, family, *layers, parse_sets(sets))
    print(config_yaml(method, config, family), end="")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from erasure.evaluation import run_eval, summary_lines

    attack_options = {"--attack-prompts": args.attack_prompts, "--attack-seeds": args.attack_seeds,
                      "--attack-steps": args.attack_steps, "--attack-images": args.attack_images}  # fmt: skip
    given = [name for name, value in attack_options.items() if value is not None]
    if given and args.attack is None:
        raise InputError(f"{given[0]} sets up an attack: add --attack ({', '.join(ATTACKS)})")
    # left out when not given: run_eval's defaults apply
    attack_settings = {k: getattr(args, k) for k in ("attack_seeds", "attack_steps") if getattr(args, k) is not None}
    path = run_eval(
        args.target, concepts=args.concept, baseline=args.baseline, json_path=args.json, samples=args.samples,
        seed=args.seed, clip=args.clip, fid_features=args.fid_features, device=args.device, dtype=args.dtype,
        model_config=args.model_config, progress=not args.quiet, attack=args.attack,
        attack_prompts=args.attack_prompts, **attack_settings,
        prompts_file=args.prompts, preserved_prompts_file=args.preserved_prompts, neighbours=args.neighbours,
        attack_images=args.attack_images, resume=args.resume,
    )  # fmt: skip
    if _is_main_process():
        print("\n".join(summary_lines(json.loads(path.read_text()))))
        print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from evaluators.comparison import compare, to_csv, to_markdown
    from pipelines.files import atomic_write, check_writable

    out = check_writable(args.out) if args.out is not None else None
    if out is not None and out.suffix.lower() not in (".md", ".csv"):
        raise InputError(f"--out {out}: write a .md (Markdown) or .csv file")
    if out is not None and out.is_dir():
        raise InputError(f"--out {out} is a folder; give the table's file name, e.g. {out / 'comparison.md'}")
    table = compare(args.reports)
    markdown = to_markdown(table)
    print(markdown, end="")
    if out is not None:
        text = to_csv(table) if out.suffix.lower() == ".csv" else markdown
        atomic_write(out, lambda tmp: tmp.write_text(text))
        print(f"wrote {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from erasure.sampling import sample

    images = args.n * max(1, len(args.prompt))
    if images > CONFIRM_IMAGES and not args.yes:
        raise InputError(f"this makes {images} images; pass --yes to confirm")
    written = sample(
        args.model, args.prompt, n=args.n, seed=args.seed, out=args.out, steps=args.steps, guidance=args.guidance,
        truncation=args.truncation, device=args.device, model_config=args.model_config, dtype=args.dtype,
        lora_strength=args.lora_strength,
    )  # fmt: skip
    print(f"wrote {written}")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from . import launch

    launch(args.model, args.erased, host=args.host, port=args.port, share=args.share, device=args.device,
           dtype=args.dtype)  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .hub import export_run

    result = export_run(
        args.run, args.repo_id, local_dir=args.local_dir, private=args.private, no_eval=args.no_eval,
        single_file=args.single_file, as_lora=args.as_lora,
        lora_format=args.lora_format,
    )  # fmt: skip
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.folder is not None:
        print(f"wrote {len(result.files)} files to {result.folder}")
    else:
        print(f"pushed {len(result.files)} files to {result.url}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from pipelines.families import FAMILIES

    width = max(len(k) for k in METHODS)
    for method in METHODS.values():
        print(f"{method.key:<{width}}  {method.summary}")
        print(f"{'':<{width}}  patches: {method.patches}; paper: {method.paper.title} ({method.paper.venue}) "
              f"{method.paper.url}")  # fmt: skip
        for family in FAMILIES.values():
            paper = preset_paper(family, method.key)
            if paper is not None:
                print(f"{'':<{width}}  on {family.name}: the preset of {paper.title} ({paper.venue}) {paper.url}")
    return 0


def cmd_zoo_list(args: argparse.Namespace) -> int:
    from pipelines.zoo import models as zoo

    quality = zoo.quality()
    print(f"embedded models in {zoo.zoo_root()}:")
    for name, (kind, summary) in zoo.EMBEDDED.items():
        present = (zoo.zoo_root() / name).is_dir()
        print(f"  {name:<13} {kind:<14} {'present' if present else 'MISSING'}  {summary}")
        for metric, value in quality.get(name, {}).items():
            print(f"  {'':<13} {metric}: {value}")
    if not quality:
        print("  (no measured quality: run `python benchmarks/zoo_quality.py --write`)")
    return 0


def cmd_zoo_build(args: argparse.Namespace) -> int:
    import json

    from pipelines.files import check_writable
    from zoo.build import build_zoo  # the recipes: an app of their own, reached only from here

    check_writable(args.out)
    try:
        report = build_zoo(args.out, seed=args.seed, scale=args.scale, only=tuple(args.only))
    except ValueError as exc:
        raise InputError(str(exc)) from None
    print(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`erasure methods | head`): stop quietly, as Unix tools do. Output still
        # buffered for the closed pipe would fail again at exit, so stdout is pointed at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("ERASURE_DEBUG") == "1"
    from erasure.finished_attacks import kept_attacks_message
    from erasure.output import interrupted_message, resumable_run
    from pipelines.logs import log_to_stderr

    log_to_stderr(verbose=args.verbose)
    try:
        return args.func(args)
    except BrokenPipeError:
        raise
    except InputError as exc:
        return _fail(f"error: {exc}", 2, debug)
    except (KeyboardInterrupt, Exception) as exc:
        if resumable_run(exc) is not None:  # a run stopped, and kept a checkpoint
            return _fail(f"error: {interrupted_message(exc)}", _interrupted_exit_code(exc), debug)
        kept = kept_attacks_message(exc)
        if kept is not None:  # an evaluation stopped, and kept the attacks it finished
            return _fail(f"error: {kept}", _interrupted_exit_code(exc), debug)
        if isinstance(exc, KeyboardInterrupt):
            return _fail("interrupted", 128 + signal.SIGINT, debug)
        # --debug is an option of `erasure` itself: placed after the command, as a bare "rerun with --debug" invites,
        # it would be refused as an unrecognized argument
        return _fail(f"error: {type(exc).__name__}: {exc} (rerun as `erasure --debug {args.command} ...` for the "
                     "traceback)", 1, debug)  # fmt: skip


def _interrupted_exit_code(exc: BaseException) -> int:
    """A shell's codes for a run stopped by a signal (128 + its number: Ctrl-C, SIGTERM, SIGHUP), else 1."""
    from erasure.training import Terminated

    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return 128 + exc.signum if isinstance(exc, Terminated) else 1


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        raise
    print(" ".join(message.split()), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

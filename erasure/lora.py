"""LoRA erasures: a method trains low-rank adapters (peft) on its scope instead of the full weights.

With `--set lora_rank=R` the method's scope still picks what changes (ESD-x: the cross-attention, AdvUnlearn:
the text encoder's blocks, ...); every Linear and Conv2d layer whose weight the scope trains gets an adapter
`W + (alpha / R) B A` and only A and B train (norms and biases in the scope stay as they are). The run folder
then holds, beside the usual pipeline (the adapters merged into the weights, so every command and plain
`from_pretrained` take it as any run), the adapters as the standard diffusers LoRA file
`pytorch_lora_weights.safetensors`, which `pipe.load_lora_weights(run)` loads into a pipeline of the base
model. `--save lora` keeps the adapters alone (the base lends every component, as for `--save changed`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.errors import InputError
from pipelines.lora_files import ADAPTER, LORA_FILE, MAX_LORA_RANK

from .config import MethodConfig


@dataclass
class LoraOptions(MethodConfig):
    """The LoRA options of a method that trains a UNet or text encoder (0: full weights, the papers')."""

    lora_rank: int = field(
        default=0, metadata={"bounds": f"[0, {MAX_LORA_RANK}]", "help": "train rank-R adapters on the scope "
                             "instead of its weights (0: the full weights, the paper's); the run also holds them as a "
                             "diffusers LoRA file"},
    )  # fmt: skip
    lora_alpha: float | None = field(
        default=None, metadata={"bounds": "(0, inf)", "help": "LoRA alpha: the update is alpha / rank * B A (default: "
                                "the rank)"},
    )  # fmt: skip
    lora_targets: list[str] = field(
        default_factory=list,
        # a preset's targets are layers of the preset's component (FLUX's ESD preset: the transformer's)
        metadata={"follows": "component", "help": "only the scope's layers whose name ends with one of these (e.g. "
                  "to_k,to_v; default: every Linear and Conv2d layer of the scope)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not self.lora_rank and (self.lora_alpha is not None or self.lora_targets):
            raise ValueError("lora_alpha and lora_targets need lora_rank > 0")


def check_lora_components(family, components: list[str]) -> None:
    """Refuse, before loading, adapters the family's LoRA file has no place for (diffusers' FLUX loader takes the
    transformer's and CLIP's, not T5's)."""
    allowed = getattr(family, "lora_components", None)
    outside = [c for c in components if allowed is not None and c not in allowed]
    if outside:
        raise InputError(f"{family.name}'s LoRA file holds {', '.join(allowed)} adapters, not {', '.join(outside)}: "
                         "choose a scope without it (e.g. text_encoder:full) or train full weights (lora_rank=0)")


def attach_lora(module: torch.nn.Module, config: LoraOptions, seed: int) -> int:
    """After the scope's selection (`select_trainable`): adapters on every Linear / Conv2d layer of `module` whose
    weight the scope trains (and whose name ends with one of `lora_targets`, if given); only they train. Their
    random start (A; B starts at zero) is drawn from `seed`. Returns their parameter count."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [
        name for name, layer in module.named_modules()
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and layer.weight.requires_grad
        and (not config.lora_targets or any(name.endswith(t) for t in config.lora_targets))
    ]  # fmt: skip
    if not names:
        raise InputError(f"lora_targets {config.lora_targets} match no Linear or Conv2d layer of the scope")
    settings = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank, target_modules=names)
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global generator: seeded, and left as it was
        torch.manual_seed(seed)
        inject_adapter_in_model(settings, module, adapter_name=ADAPTER)
    count = 0
    for name, param in module.named_parameters():
        param.requires_grad_(".lora_" in name)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # adapters on a half-precision base still train in float32
        count += param.numel() if param.requires_grad else 0
    return count


@contextmanager
def adapters_disabled(module: torch.nn.Module):
    """`module` computing as its base weights, the adapters switched off (and frozen) while inside: the original
    model of a loss, without a copy of the network."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def has_lora(module: torch.nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in module.named_parameters())


def take_adapters(model, components: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The adapters of each of `components` of `model` (peft's names, without the adapter's), then merged into the
    weights and removed: the model is a plain pipeline again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters = {}
    for name in components:
        module = getattr(model, name)
        if not has_lora(module):
            continue
        # peft's parameter names carry the adapter's (`to_k.lora_A.erasure.weight`); the LoRA file's do not. (The
        # adapters may have been injected into a larger module, SDXL's text tower: read them off the component.)
        adapters[name] = {k.replace(f".{ADAPTER}.", "."): v.detach().cpu().clone()
                          for k, v in module.named_parameters() if ".lora_" in k}  # fmt: skip
        for path, layer in list(module.named_modules()):
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
                parent_path, _, child = path.rpartition(".")
                setattr(module.get_submodule(parent_path) if parent_path else module, child, layer.get_base_layer())
    return adapters


def save_adapters(pipeline_class, directory: Path, adapters: dict[str, dict[str, torch.Tensor]], rank: int,
                  alpha: float) -> Path:  # fmt: skip
    """Write `adapters` as the diffusers LoRA file of `pipeline_class` (its `load_lora_weights` reads it)."""
    layers, metadata = {}, {}
    for name, state in adapters.items():
        # Only what a LoraConfig needs (peft's full to_dict() names fields older peft releases refuse). The targets
        # match by suffix, so the flattened names below find the layers with or without `text_model.`
        targets = sorted({k.split(".lora_")[0] for k in state})
        metadata[f"{name}_lora_adapter_metadata"] = {"r": rank, "lora_alpha": alpha, "target_modules": targets}
        if name.startswith("text_encoder"):  # transformers >= 5.6 flattened CLIPTextModel; the file keeps the level
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
        layers[f"{name}_lora_layers"] = state
    pipeline_class.save_lora_weights(directory, **layers, **metadata, safe_serialization=True)
    return directory / LORA_FILE


def adapter_size(path: Path) -> dict:
    """The LoRA file's size on disk and its parameter count."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        count = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    return {"file": path.name, "bytes": path.stat().st_size, "parameters": count}


def reduce_to_lora(run_dir: Path, rank: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """A full-weight run as LoRA adapters: each changed Linear / Conv2d weight's change from the base, cut to its
    `rank` leading singular directions (B = U sqrt(S), A = sqrt(S) V^T; a convolution's kernel is flattened for
    the SVD and its B is 1x1). Returns the adapters per component (peft's names, as `take_adapters`) and the
    relative Frobenius error of the reduction, overall and of the worst layer; the other weights that changed
    (norms, biases) are not in the adapters and are counted apart."""
    from erasure.output import read_run, recorded_base_model
    from pipelines import load_model

    manifest = read_run(run_dir)
    run, base = load_model(str(run_dir), device="cpu"), load_model(recorded_base_model(manifest), device="cpu")
    adapters, squared_error, squared_change, worst, left_out = {}, 0.0, 0.0, 0.0, 0
    for component in manifest["changed_components"]:
        ours, theirs = getattr(run, component), getattr(base, component)
        before = dict(theirs.named_modules())
        state, covered = {}, set()
        for name, layer in ours.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            delta = (layer.weight - before[name].weight).detach().double()
            if not delta.any():
                continue
            matrix = delta.flatten(1)
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            r = min(rank, len(s))
            b, a = u[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r]
            # every layer gets exactly `rank` rows (zeros past its own rank), as one LoRA config describes them
            b = torch.nn.functional.pad(b, (0, rank - r))
            a = torch.nn.functional.pad(a, (0, 0, 0, rank - r))
            error = (matrix - b @ a).pow(2).sum().item()
            squared_error, squared_change = squared_error + error, squared_change + matrix.pow(2).sum().item()
            worst = max(worst, (error / matrix.pow(2).sum().item()) ** 0.5)
            shape = delta.shape
            if layer.weight.dim() == 4:  # A: a convolution of the layer's kernel; B: 1x1
                a, b = a.reshape(rank, *shape[1:]), b.reshape(shape[0], rank, 1, 1)
            state[f"{name}.lora_A.weight"] = a.float().contiguous()
            state[f"{name}.lora_B.weight"] = b.float().contiguous()
            covered.add(f"{name}.weight")
        for (param_name, param), original in zip(ours.named_parameters(), theirs.parameters()):
            left_out += param_name not in covered and not torch.equal(param, original)
        if state:
            adapters[component] = state
    if not adapters:
        raise InputError(f"{run_dir} changed no Linear or Conv2d weight of its base: nothing to reduce to a LoRA")
    report = {"rank": rank, "relative_error": round((squared_error / max(squared_change, 1e-30)) ** 0.5, 6),
              "worst_layer_relative_error": round(worst, 6), "changed_tensors_left_out": left_out}  # fmt: skip
    return adapters, report


def load_at_strength(run_dir: str | Path, strength: float, **load):
    """A run trained as LoRA with its erasure at `strength` (0: off, the base model; 1: the run): its base model
    with the run's adapters fused at that weight by diffusers' loader. `load`: `load_model`'s options."""
    from erasure.output import read_run, recorded_base_model
    from pipelines import load_model, resolve
    from pipelines.lora_files import apply_lora_files

    manifest = read_run(run_dir)
    if not (Path(run_dir) / LORA_FILE).is_file():
        raise InputError(f"{run_dir} was not trained as LoRA adapters (--set lora_rank=R): it has no strength to set")
    if resolve(str(run_dir)).kind == "one-step":
        # SFD's adapters belong to its one-step generator: on the multi-step base they would draw neither the base
        # nor the erasure, and at 0 the generator would be the teacher's UNet in one step, which is no base either.
        raise InputError(f"{run_dir} is a one-step generator (SFD): its LoRA adapters are part of the generator, not "
                         "an erasure of its base, so it is drawn as trained only (strength 1)")
    model = load_model(recorded_base_model(manifest), **load)
    apply_lora_files(model.pipe, [run_dir], [strength])
    return model

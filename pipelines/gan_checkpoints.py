"""StyleGAN2 checkpoints in, safetensors out - and no pickled code ever runs.

Formats read:
- this project's folders: `generator_config.json` + `generator.safetensors` (+ `discriminator.safetensors`);
- rosinality `.pt` (`g_ema`, optional `g`, `d`, `latent_avg`, and in training snapshots `args`, an
  `argparse.Namespace`): `torch.load(weights_only=True)` with only `argparse.Namespace` allowed;
- NVIDIA stylegan2-ada-pytorch `.pkl`: its networks are pickled *with their source code*
  (torch_utils.persistence), which an ordinary unpickler would execute. `RestrictedUnpickler`
  resolves only an allow-list of globals; persistent objects become inert records of their
  parameters and buffers (their `module_src` is never touched), tensors are rebuilt with
  weights-only loading, and anything else is refused.

NVIDIA -> this layout (= rosinality's), for G_ema (the pickle's discriminator is not read):
  mapping.fc{i}.{weight,bias}             -> style.{i+1}.{weight,bias}
  mapping.w_avg                           -> latent_avg
  synthesis.b4.const                      -> input.input            (unsqueeze 0)
  synthesis.b4.conv1.*                    -> conv1.*
  synthesis.b4.torgb.*                    -> to_rgb1.*
  synthesis.b{2^i}.conv0 / conv1 / torgb  -> convs.{2(i-3)} / convs.{2(i-3)+1} / to_rgbs.{i-3}
  layer .weight                           -> .conv.weight           (unsqueeze 0; both ports flip the
                                                                     TF up-conv kernel the same way, so
                                                                     no flip is needed between them)
  layer .affine.{weight,bias}             -> .conv.modulation.{weight,bias}
  layer .bias / .noise_strength           -> .activate.bias / .noise.weight   (torgb: .bias as [1,3,1,1])
  layer .noise_const                      -> noises.noise_{k}
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import InputError
from .safe_load import load_tensors, refusal_reason
from .stylegan2 import Discriminator, Generator, StyleGAN2Config

CONFIG_FILE = "generator_config.json"
G_FILE, D_FILE = "generator.safetensors", "discriminator.safetensors"


# --- this project's format ---------------------------------------------------------------------


def save_gan(directory: str | Path, generator: Generator, discriminator: Discriminator | None = None,
             latent_avg: torch.Tensor | None = None) -> None:  # fmt: skip
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in generator.state_dict().items()}
    if latent_avg is not None:
        state["latent_avg"] = latent_avg.detach().reshape(-1).contiguous().cpu()
    save_file(state, str(directory / G_FILE))
    if discriminator is not None:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in discriminator.state_dict().items()}, str(directory / D_FILE)
        )
    config = {"architecture": "StyleGAN2", "layout": "rosinality", **generator.config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_gan_folder(directory: Path) -> tuple[Generator, Discriminator | None, torch.Tensor | None]:
    from safetensors.torch import load_file

    from .loading import check_safetensors

    check_safetensors(directory)
    raw = json.loads((directory / CONFIG_FILE).read_text())
    config = StyleGAN2Config(**{k: raw[k] for k in ("size", "style_dim", "n_mlp", "channels", "lr_mlp") if k in raw})
    state = load_file(str(directory / G_FILE))
    latent_avg = state.pop("latent_avg", None)
    generator = _build(Generator(config), state, "generator")
    discriminator = None
    if (directory / D_FILE).is_file():
        discriminator = _build(Discriminator(config), load_file(str(directory / D_FILE)), "discriminator")
    return generator, discriminator, latent_avg


def _build(module, state: dict, what: str):
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"the {what} weights do not match the architecture: {str(exc).splitlines()[0]}") from None
    return module.eval()


# --- architecture inference --------------------------------------------------------------------


def infer_config(state: dict[str, torch.Tensor]) -> StyleGAN2Config:
    """Read size, style_dim, n_mlp and channels off a rosinality-layout generator state dict."""
    try:
        n_mlp = len({k.split(".")[1] for k in state if re.match(r"style\.\d+\.weight$", k)})
        style_dim = state["style.1.weight"].shape[1]
        n_rgbs = len({k.split(".")[1] for k in state if k.startswith("to_rgbs.")})
        size = 2 ** (n_rgbs + 2)
        channels = {4: state["conv1.conv.weight"].shape[1]}
        for i in range(n_rgbs):
            channels[2 ** (i + 3)] = state[f"convs.{2 * i}.conv.weight"].shape[1]
    except KeyError as exc:
        raise InputError(f"not a StyleGAN2 generator state dict (missing {exc})") from None
    return StyleGAN2Config(size=size, style_dim=style_dim, n_mlp=n_mlp, channels=channels)


# --- rosinality .pt ----------------------------------------------------------------------------


def load_rosinality(path: Path) -> tuple[Generator, Discriminator | None, torch.Tensor | None]:
    ckpt = load_tensors(path, str(path), allowed_globals=[argparse.Namespace])
    if not isinstance(ckpt, dict) or "g_ema" not in ckpt:
        raise InputError(f"{path} is not a rosinality StyleGAN2 checkpoint (no 'g_ema')")
    g_state = ckpt["g_ema"]
    config = infer_config(g_state)
    generator = _build(Generator(config), g_state, "generator")
    discriminator = _build(Discriminator(config), ckpt["d"], "discriminator") if "d" in ckpt else None
    return generator, discriminator, ckpt.get("latent_avg")


def save_rosinality(path: str | Path, generator: Generator, discriminator: Discriminator | None = None,
                    latent_avg: torch.Tensor | None = None) -> None:  # fmt: skip
    """Write a rosinality-format `.pt` (what Adapt-then-Unlearn and StyleGAN-NADA read)."""
    ckpt = {"g_ema": generator.state_dict()}
    if discriminator is not None:
        ckpt["d"] = discriminator.state_dict()
    if latent_avg is not None:
        ckpt["latent_avg"] = latent_avg
    torch.save(ckpt, path)


# --- NVIDIA stylegan2-ada-pytorch .pkl -------------------------------------------------------------


class PersistentRecord:
    """What a pickled NVIDIA network becomes here: its class name and its state, never its code."""

    def __init__(self, meta: dict):
        self.class_name = meta.get("class_name", "?")
        self.state = meta.get("state") or {}


class _AttrDict(dict):
    """Stand-in for dnnlib.EasyDict (a dict with attribute access) - data only."""


def _rebuild_persistent(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("unexpected persistent object")
    return PersistentRecord(meta)


def _storage_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rebuild_parameter(data, requires_grad, backward_hooks, *args):
    return torch.nn.Parameter(data, requires_grad=requires_grad)


def _rebuild_tensor(storage, offset, size, stride, requires_grad, backward_hooks, *metadata):
    if backward_hooks:  # hooks are callables a file must not hand us, however allow-listed
        raise pickle.UnpicklingError("refused a tensor with backward hooks")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict(), *metadata)


class RestrictedUnpickler(pickle._Unpickler):
    """Resolves only tensors, plain containers and NVIDIA's persistence records.

    The pure-Python unpickler, because its opcodes can be overridden: BUILD sets attributes of whatever sits
    below it, and on an allow-listed function or class that would outlive the load (a refused file could still
    rewrite, say, a tensor rebuilder's defaults for every later load in the process). Here it may set the
    state of a record or an EasyDict only.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "dict"): dict,
        ("builtins", "list"): list,
        ("builtins", "tuple"): tuple,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _rebuild_persistent,
        ("dnnlib.util", "EasyDict"): _AttrDict,
    }

    def find_class(self, module: str, name: str):
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return found

    def load_build(self):
        target = self.stack[-2]  # BUILD's state is on top, the object it sets below it
        if not isinstance(target, (PersistentRecord, _AttrDict)):
            raise pickle.UnpicklingError(f"refused to set the state of {type(target).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def read_nvidia_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        reason = refusal_reason(exc)
        raise InputError(f"refused to load {path}: {reason} (only StyleGAN2 weights are read from pickles)") from None
    except Exception as exc:
        raise InputError(f"cannot read {path} as a StyleGAN2 pickle: {refusal_reason(exc)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("G_ema"), PersistentRecord):
        raise InputError(f"{path} is not an NVIDIA StyleGAN2 pickle (no 'G_ema' network)")
    return data


def flatten_record(record: PersistentRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """Dotted parameter/buffer names of a pickled network, like `state_dict()` would give."""
    out: dict[str, torch.Tensor] = {}
    state = record.state
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None:
                out[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, PersistentRecord):
            out.update(flatten_record(child, f"{prefix}{name}."))
    return out


def _layer(nv: dict, src: str, dst: str, out: dict, rgb: bool = False) -> None:
    out[f"{dst}.conv.weight"] = nv[f"{src}.weight"].unsqueeze(0)
    out[f"{dst}.conv.modulation.weight"] = nv[f"{src}.affine.weight"]
    out[f"{dst}.conv.modulation.bias"] = nv[f"{src}.affine.bias"]
    if rgb:
        out[f"{dst}.bias"] = nv[f"{src}.bias"].view(1, 3, 1, 1)
    else:
        out[f"{dst}.activate.bias"] = nv[f"{src}.bias"]
        out[f"{dst}.noise.weight"] = nv[f"{src}.noise_strength"].reshape(1)


def nvidia_generator_to_rosinality(nv: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor | None]:
    out: dict[str, torch.Tensor] = {}
    fcs = sorted(int(m.group(1)) for k in nv if (m := re.match(r"mapping\.fc(\d+)\.weight$", k)))
    for i in fcs:
        out[f"style.{i + 1}.weight"] = nv[f"mapping.fc{i}.weight"]
        out[f"style.{i + 1}.bias"] = nv[f"mapping.fc{i}.bias"]
    resolutions = sorted({int(m.group(1)) for k in nv if (m := re.match(r"synthesis\.b(\d+)\.", k))})
    out["input.input"] = nv["synthesis.b4.const"].unsqueeze(0)
    _layer(nv, "synthesis.b4.conv1", "conv1", out)
    _layer(nv, "synthesis.b4.torgb", "to_rgb1", out, rgb=True)
    noises = [nv.get("synthesis.b4.conv1.noise_const")]
    for k, res in enumerate(r for r in resolutions if r > 4):
        _layer(nv, f"synthesis.b{res}.conv0", f"convs.{2 * k}", out)
        _layer(nv, f"synthesis.b{res}.conv1", f"convs.{2 * k + 1}", out)
        _layer(nv, f"synthesis.b{res}.torgb", f"to_rgbs.{k}", out, rgb=True)
        noises += [nv.get(f"synthesis.b{res}.conv0.noise_const"), nv.get(f"synthesis.b{res}.conv1.noise_const")]
    for i, noise in enumerate(noises):
        if noise is not None:
            out[f"noises.noise_{i}"] = noise.reshape(1, 1, *noise.shape[-2:])
    return out, nv.get("mapping.w_avg")


def nvidia_discriminator_to_rosinality(nv: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor] | None:
    """NVIDIA's residual discriminator (`architecture='resnet'`, unconditional) in this layout:
        b{size}.fromrgb                 -> convs.0
        b{r}.conv0 / conv1 / skip       -> convs.{k}.conv1 / conv2 / skip   (k = 1 at r = size, then down)
        b4.conv / fc / out              -> final_conv / final_linear.0 / final_linear.1
    (a layer's .weight stays; its .bias moves to the activation where ours has one). None for other
    architectures and conditional discriminators."""
    if f"b{size}.fromrgb.weight" not in nv or nv.get("b4.out.weight", torch.empty(0, 0)).shape[0] != 1:
        return None
    out = {"convs.0.0.weight": nv[f"b{size}.fromrgb.weight"], "convs.0.1.bias": nv[f"b{size}.fromrgb.bias"]}
    res, k = size, 1
    while res > 4:
        if f"b{res}.skip.weight" not in nv:
            return None
        out[f"convs.{k}.conv1.0.weight"], out[f"convs.{k}.conv1.1.bias"] = (
            nv[f"b{res}.conv0.weight"],
            nv[f"b{res}.conv0.bias"],
        )
        out[f"convs.{k}.conv2.1.weight"], out[f"convs.{k}.conv2.2.bias"] = (
            nv[f"b{res}.conv1.weight"],
            nv[f"b{res}.conv1.bias"],
        )
        out[f"convs.{k}.skip.1.weight"] = nv[f"b{res}.skip.weight"]
        res, k = res // 2, k + 1
    out["final_conv.0.weight"], out["final_conv.1.bias"] = nv["b4.conv.weight"], nv["b4.conv.bias"]
    for i, layer in enumerate(("fc", "out")):
        out[f"final_linear.{i}.weight"], out[f"final_linear.{i}.bias"] = (
            nv[f"b4.{layer}.weight"],
            nv[f"b4.{layer}.bias"],
        )
    return out


def load_nvidia(path: Path) -> tuple[Generator, Discriminator | None, torch.Tensor | None]:
    data = read_nvidia_pickle(path)
    try:
        state, w_avg = nvidia_generator_to_rosinality(flatten_record(data["G_ema"]))
        config = infer_config(state)
    except (KeyError, IndexError, ValueError, InputError) as exc:
        raise InputError(f"{path}: its G_ema holds no StyleGAN2 generator weights ({exc})") from None
    generator = Generator(config)
    missing = [
        k for k in generator.state_dict() if k not in state and not k.startswith("noises.") and not k.endswith("kernel")
    ]
    if missing:
        raise InputError(f"{path}: the generator lacks {len(missing)} weights, e.g. {missing[0]}")
    defaults = generator.state_dict()
    generator.load_state_dict({**defaults, **state})
    discriminator = None
    if isinstance(data.get("D"), PersistentRecord):  # absent from pickles that hold G_ema alone
        d_state = nvidia_discriminator_to_rosinality(flatten_record(data["D"]), config.size)
        if d_state is None:
            raise InputError(f"{path}: its discriminator is not StyleGAN2's unconditional residual one")
        discriminator = Discriminator(config)
        discriminator = _build(discriminator, {**discriminator.state_dict(), **d_state}, f"{path.name} discriminator")
    return generator.eval(), discriminator, None if w_avg is None else w_avg.reshape(1, -1)


def load_any(path: Path) -> tuple[Generator, Discriminator | None, torch.Tensor | None]:
    """Folder, `.pt` or `.pkl` -> (generator, discriminator or None, mean w or None)."""
    if path.is_dir():
        folder = path if (path / CONFIG_FILE).is_file() else path / "generator"
        return load_gan_folder(folder)
    if path.suffix == ".pt":
        return load_rosinality(path)
    if path.suffix == ".pkl":
        return load_nvidia(path)
    raise InputError(f"{path}: not a StyleGAN2 checkpoint (.pt, .pkl or a saved folder)")

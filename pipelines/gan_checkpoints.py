"""StyleGAN2 checkpoints in, safetensors out - and no pickled code ever runs.

Formats read:
- this project's folders: `generator_config.json` + `generator.safetensors` (+ `discriminator.safetensors`);
- rosinality `.pt` (`g_ema`, optional `g`, `d`, `latent_avg`, and in training snapshots `args`, an
  `argparse.Namespace`): `torch.load(weights_only=True)` with only `argparse.Namespace` allowed;
- NVIDIA stylegan2-ada-pytorch `.pkl`: its networks are pickled *with their source code*
  (torch_utils.persistence), which an ordinary unpickler would execute. `RestrictedUnpickler`
  resolves only an allow-list of globals; persistent objects become inert records of their
  parameters and buffers (their `module_src` is never touched), tensors are rebuilt with
  weights-only loading, numpy's plain numeric scalars (the layers' gains) are read from their bytes,
  and anything else is refused.

Every format declares its architecture, so a file of a few bytes could ask for a generator of any size:
it is checked against fixed limits (`checked_config`) before anything is built.

NVIDIA -> this layout (= rosinality's), for G_ema (the pickle's residual discriminator, D, is mapped by
`nvidia_discriminator_to_rosinality`):
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
import dataclasses
import io
import json
import math
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .files import read_json
from .safe_load import load_tensors, refusal_reason, torch_file_refusal
from .stylegan2 import Discriminator, Generator, StyleGAN2Config, default_channels

CONFIG_FILE = "generator_config.json"
G_FILE, D_FILE = "generator.safetensors", "discriminator.safetensors"

# The largest architecture a file may declare: every released StyleGAN2 fits with room to spare (FFHQ 1024:
# size 1024, at most 512 channels, style_dim 512, n_mlp 8), while the worst a tiny file can now ask for is
# about 1.8 GB of weights (generator and discriminator at every limit), not any amount.
MAX_SIZE, MAX_CHANNELS, MAX_STYLE_DIM, MAX_MLP = 2048, 1024, 1024, 16


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

    from .loading import check_weight_files

    check_weight_files(directory)
    if not (directory / G_FILE).is_file():
        raise InputError(f"{directory} has no {G_FILE}")
    config = checked_config(_read_config_file(directory / CONFIG_FILE), str(directory / CONFIG_FILE))
    state = load_file(str(directory / G_FILE))
    latent_avg = _checked_latent(state.pop("latent_avg", None), config, str(directory / G_FILE))
    generator = _build(Generator(config), state, "generator")
    discriminator = None
    if (directory / D_FILE).is_file():
        discriminator = _build(Discriminator(config), load_file(str(directory / D_FILE)), "discriminator")
    return generator, discriminator, latent_avg


def _read_config_file(path: Path) -> dict:
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise InputError(f"{path} is not a generator config (a JSON object with size, style_dim, n_mlp, channels)")
    return raw


def _build(module, state, what: str):
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:  # TypeError: not a state dict at all
        raise InputError(f"the {what} weights do not match the architecture: {str(exc).splitlines()[0]}") from None
    return module.eval()


def _checked_latent(latent, config: StyleGAN2Config, source: str) -> torch.Tensor | None:
    """The file's mean w as [1, style_dim] (None if it has none), refused unless it is one."""
    if latent is None:
        return None
    if not isinstance(latent, torch.Tensor) or latent.numel() != config.style_dim:
        raise InputError(f"{source}: its mean w (latent_avg) is not a vector of style_dim={config.style_dim} numbers")
    return latent.reshape(1, -1)


# --- architecture ------------------------------------------------------------------------------


def checked_config(values: dict, source: str) -> StyleGAN2Config:
    """The architecture a file declares, refused in one line unless it is within the limits above.

    Missing fields take StyleGAN2Config's defaults, as missing channels take StyleGAN2's."""
    defaults = {f.name: f.default for f in dataclasses.fields(StyleGAN2Config)}
    size, style_dim, n_mlp, lr_mlp = (values.get(k, defaults[k]) for k in ("size", "style_dim", "n_mlp", "lr_mlp"))
    channels = values.get("channels") or default_channels(size if _is_int(size, 8, MAX_SIZE) else 8)
    problem = _architecture_problem(size, style_dim, n_mlp, lr_mlp, channels)
    if problem:
        raise InputError(f"{source}: unsupported StyleGAN2 architecture: {problem}")
    channels = {r: c for r, c in _by_resolution(channels).items() if r <= size}
    return StyleGAN2Config(size=size, style_dim=style_dim, n_mlp=n_mlp, channels=channels, lr_mlp=float(lr_mlp))


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _by_resolution(channels: dict) -> dict:
    """Channels keyed by int resolution (JSON keys are strings); keys that are no resolution are left out."""
    out = {}
    for key, count in channels.items():
        if isinstance(key, str) and key.isdecimal() and len(key) < 6:  # int() refuses strings of 4300+ digits
            key = int(key)
        if isinstance(key, int):
            out[key] = count
    return out


def _architecture_problem(size, style_dim, n_mlp, lr_mlp, channels) -> str | None:
    if not (_is_int(size, 8, MAX_SIZE) and size & (size - 1) == 0):
        return f"size must be a power of two from 8 to {MAX_SIZE}, not {size!r}"
    for name, value, limit in (("style_dim", style_dim, MAX_STYLE_DIM), ("n_mlp", n_mlp, MAX_MLP)):
        if not _is_int(value, 1, limit):
            return f"{name} must be an integer from 1 to {limit}, not {value!r}"
    if isinstance(lr_mlp, bool) or not isinstance(lr_mlp, (int, float)) or not 0 < lr_mlp < math.inf:
        return f"lr_mlp must be a positive number, not {lr_mlp!r}"
    if not isinstance(channels, dict):
        return "channels must map each resolution to its number of channels"
    by_resolution = _by_resolution(channels)
    for res in (2**i for i in range(2, size.bit_length())):
        count = by_resolution.get(res)
        if not _is_int(count, 1, MAX_CHANNELS):
            return f"channels at resolution {res} must be an integer from 1 to {MAX_CHANNELS}, not {count!r}"
    return None


def infer_config(state: dict[str, torch.Tensor], source: str) -> StyleGAN2Config:
    """Read size, style_dim, n_mlp and channels off a rosinality-layout generator state dict."""
    try:
        n_mlp = len({k.split(".")[1] for k in state if re.match(r"style\.\d+\.weight$", k)})
        style_dim = state["style.1.weight"].shape[1]
        n_rgbs = len({k.split(".")[1] for k in state if k.startswith("to_rgbs.")})
        channels = {4: state["conv1.conv.weight"].shape[1]}
        for i in range(n_rgbs):
            channels[2 ** (i + 3)] = state[f"convs.{2 * i}.conv.weight"].shape[1]
    except KeyError as exc:
        raise InputError(f"{source}: not a StyleGAN2 generator state dict (missing {exc})") from None
    except (TypeError, AttributeError, IndexError):  # keys that are not names, values that are not weights
        raise InputError(f"{source}: not a StyleGAN2 generator state dict") from None
    declared = {"size": 2 ** (n_rgbs + 2), "style_dim": style_dim, "n_mlp": n_mlp, "channels": channels}
    return checked_config(declared, source)


# --- rosinality .pt ----------------------------------------------------------------------------


def load_rosinality(path: Path) -> tuple[Generator, Discriminator | None, torch.Tensor | None]:
    ckpt = load_tensors(path, str(path), allowed_globals=[argparse.Namespace])
    if not isinstance(ckpt, dict) or "g_ema" not in ckpt:
        raise InputError(f"{path} is not a rosinality StyleGAN2 checkpoint (no 'g_ema')")
    g_state = ckpt["g_ema"]
    if not isinstance(g_state, dict):
        raise InputError(f"{path}: its g_ema is not a generator state dict")
    config = infer_config(g_state, str(path))
    generator = _build(Generator(config), g_state, "generator")
    discriminator = _build(Discriminator(config), ckpt["d"], "discriminator") if "d" in ckpt else None
    return generator, discriminator, _checked_latent(ckpt.get("latent_avg"), config, str(path))


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


# NVIDIA's layers keep their gains as numpy float64 scalars (`lr_multiplier / np.sqrt(in_features)`), which pickle
# as numpy.dtype(name, align, copy) with BUILD(state), then multiarray.scalar(dtype, raw bytes). Both are rebuilt
# from data alone, for plain numbers only: numpy's own reconstructors would also make object dtypes, whose
# scalars unpickle arbitrary objects.
NUMERIC_DTYPE = re.compile(r"[biufc]\d{1,2}$")  # bool, int, uint, float, complex of a given byte size


class _NumpyDtype:
    """Stand-in for numpy.dtype(name, align, copy): the name of a plain numeric dtype and its byte order."""

    def __init__(self, name, align=False, copy=False):
        try:  # np.dtype only parses the names the pattern lets through: "f8", "i4", "b1"...
            self.dtype = np.dtype(name) if isinstance(name, str) and NUMERIC_DTYPE.match(name) else None
        except TypeError:  # "f9" and the like
            self.dtype = None
        if self.dtype is None or self.dtype.kind not in "biufc":
            raise pickle.UnpicklingError(f"refused numpy dtype {name!r} (only plain numbers are read)")

    def __setstate__(self, state):
        # (version, byte order, subarray, names, fields, ...): a plain number has no sub-array and no fields
        plain = isinstance(state, tuple) and len(state) > 4 and state[2:5] == (None, None, None)
        if not (plain and state[1] in ("<", ">", "|", "=")):
            raise pickle.UnpicklingError("refused a numpy dtype with sub-arrays or fields")
        self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data=None):
    """Stand-in for numpy's multiarray.scalar(dtype, raw bytes): the number read back from its bytes."""
    if not (isinstance(dtype, _NumpyDtype) and isinstance(data, bytes) and len(data) == dtype.dtype.itemsize):
        raise pickle.UnpicklingError("refused a numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


def _rebuild_parameter(data, requires_grad, backward_hooks, *args):
    return torch.nn.Parameter(data, requires_grad=requires_grad)


def _rebuild_tensor(storage, offset, size, stride, requires_grad, backward_hooks, *metadata):
    if backward_hooks:  # hooks are callables a file must not hand us, however allow-listed
        raise pickle.UnpicklingError("refused a tensor with backward hooks")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict(), *metadata)


class RestrictedUnpickler(pickle._Unpickler):
    """Resolves only tensors, plain containers, numpy's plain numbers and NVIDIA's persistence records.

    The pure-Python unpickler, because its opcodes can be overridden: BUILD sets attributes of whatever sits
    below it, and on an allow-listed function or class that would outlive the load (a refused file could still
    rewrite, say, a tensor rebuilder's defaults for every later load in the process). Here it may set the
    state of a record, an EasyDict or a numpy dtype stand-in only.

    Storages come as torch-serialized payloads (`torch.storage._load_from_bytes`); one payload can be
    referenced any number of times, so each is decoded once, and all of them together to no more bytes
    than the file holds (`max_decoded_bytes`).
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
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _rebuild_persistent,
        ("dnnlib.util", "EasyDict"): _AttrDict,
        ("numpy", "dtype"): _NumpyDtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy < 2
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    }

    def __init__(self, file, max_decoded_bytes: int):
        super().__init__(file)
        self.max_decoded_bytes = max_decoded_bytes
        self.decoded_bytes = 0
        self.storages: dict[int, tuple[bytes, object]] = {}  # id(payload) -> (payload, kept alive; storage)

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return self.storage_from_bytes  # bound: the cache and the byte count are this load's
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return found

    def storage_from_bytes(self, data: bytes):
        if not isinstance(data, bytes):
            raise pickle.UnpicklingError("refused a storage that is not serialized bytes")
        if id(data) in self.storages:
            return self.storages[id(data)][1]
        try:
            reason = torch_file_refusal(io.BytesIO(data))
        except zipfile.BadZipFile as exc:
            raise pickle.UnpicklingError(f"a serialized storage is damaged ({exc})") from None
        if reason:
            raise pickle.UnpicklingError(f"refused a serialized storage ({reason})")
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if isinstance(storage, torch.TypedStorage):  # what NVIDIA's pickles hold; its nbytes() warns of deprecation
            self.decoded_bytes += storage._nbytes()
        elif isinstance(storage, torch.UntypedStorage):
            self.decoded_bytes += storage.nbytes()
        else:
            raise pickle.UnpicklingError(f"refused a serialized storage that holds a {type(storage).__name__}")
        if self.decoded_bytes > self.max_decoded_bytes:
            raise pickle.UnpicklingError("refused storages that decode to more bytes than the file holds")
        self.storages[id(data)] = (data, storage)
        return storage

    def load_build(self):
        target = self.stack[-2]  # BUILD's state is on top, the object it sets below it
        if not isinstance(target, (PersistentRecord, _AttrDict, _NumpyDtype)):
            raise pickle.UnpicklingError(f"refused to set the state of {type(target).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def read_nvidia_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = RestrictedUnpickler(f, max_decoded_bytes=path.stat().st_size).load()
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


# What reading a pickled network's tensors in our layout raises when they are not what StyleGAN2's are.
NOT_STYLEGAN2 = (KeyError, IndexError, ValueError, TypeError, AttributeError, RuntimeError)


def _generator_state(record: PersistentRecord, path: Path) -> tuple[dict, torch.Tensor | None]:
    """G_ema's weights in this layout and its mean w, or one readable refusal."""
    try:
        nv = flatten_record(record)
        if any(k.startswith("mapping.embed.") for k in nv):  # a class-label embedding: c_dim > 0
            raise InputError(f"{path}: a conditional StyleGAN2 (generating from class labels) is not supported")
        return nvidia_generator_to_rosinality(nv)
    except NOT_STYLEGAN2 as exc:
        raise InputError(f"{path}: its G_ema holds no StyleGAN2 generator weights ({exc})") from None


def load_nvidia(path: Path) -> tuple[Generator, Discriminator | None, torch.Tensor | None]:
    data = read_nvidia_pickle(path)
    state, w_avg = _generator_state(data["G_ema"], path)
    config = infer_config(state, str(path))
    generator = Generator(config)
    missing = [
        k for k in generator.state_dict() if k not in state and not k.startswith("noises.") and not k.endswith("kernel")
    ]
    if missing:
        raise InputError(f"{path}: the generator lacks {len(missing)} weights, e.g. {missing[0]}")
    generator = _build(generator, {**generator.state_dict(), **state}, "generator")
    discriminator = None
    if isinstance(data.get("D"), PersistentRecord):  # absent from pickles that hold G_ema alone
        try:
            d_state = nvidia_discriminator_to_rosinality(flatten_record(data["D"]), config.size)
        except NOT_STYLEGAN2:
            d_state = None
        if d_state is None:
            raise InputError(f"{path}: its discriminator is not StyleGAN2's unconditional residual one")
        discriminator = Discriminator(config)
        discriminator = _build(discriminator, {**discriminator.state_dict(), **d_state}, f"{path.name} discriminator")
    return generator, discriminator, _checked_latent(w_avg, config, str(path))


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

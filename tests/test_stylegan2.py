"""StyleGAN2: tiny forward/backward, checkpoint formats, and pickles that must never run code."""

import argparse
import io
import json
import math
import os
import pickle
import sys
import types
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines import InputError, load_model
from pipelines.gan_checkpoints import (
    CONFIG_FILE,
    RestrictedUnpickler,
    flatten_record,
    read_nvidia_pickle,
    save_gan,
    save_rosinality,
)
from pipelines.stylegan2 import (
    Discriminator,
    EqualLinear,
    Generator,
    ModulatedConv2d,
    ResBlock,
    StyleGAN2Config,
    Upsample,
    default_channels,
)

from .conftest import without_storage_bytes

TINY = StyleGAN2Config(size=16, style_dim=8, n_mlp=2, channels={4: 8, 8: 8, 16: 4})


def _tiny(seed=0):
    torch.manual_seed(seed)
    generator, discriminator = Generator(TINY).eval(), Discriminator(TINY).eval()
    with torch.no_grad():  # non-zero noise strengths and biases, so the mapping of every tensor matters
        for name, p in generator.named_parameters():
            if name.endswith(("noise.weight", "activate.bias", "bias")) and "modulation" not in name:
                p.normal_(0, 0.1)
    return generator, discriminator


def _images(generator, seeds=(0, 1, 2)):
    z = torch.cat([torch.randn(1, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        return generator(z, randomize_noise=False)


def test_forward_and_backward():
    generator, discriminator = _tiny()
    images = generator(torch.randn(4, 8))
    assert images.shape == (4, 3, 16, 16)
    scores = discriminator(images)
    assert scores.shape == (4, 1)
    scores.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in generator.parameters())
    assert all(p.grad is not None for p in discriminator.parameters())
    w_plus = generator.mapping(torch.randn(2, 8))[:, None].repeat(1, generator.n_latent, 1)
    assert generator.synthesis(w_plus).shape == (2, 3, 16, 16)


def test_rosinality_checkpoint_loads_back_identically(tmp_path):
    generator, discriminator = _tiny()
    path = tmp_path / "snapshot.pt"
    latent_avg = generator.mean_latent(64)
    torch.save({"g_ema": generator.state_dict(), "d": discriminator.state_dict(), "latent_avg": latent_avg,
                "args": argparse.Namespace(size=16, latent=8, n_mlp=2)}, path)  # fmt: skip
    model = load_model(str(path))
    assert model.kind == "gan" and model.generator.config.channels == TINY.channels
    assert torch.equal(_images(model.generator), _images(generator))
    assert torch.equal(model.latent_avg, latent_avg)
    assert model.discriminator is not None
    # and our own safetensors folder round-trips too
    model.save(tmp_path / "folder")
    again = load_model(str(tmp_path / "folder"))
    assert torch.equal(_images(again.generator), _images(generator))
    assert torch.equal(again.latent_avg, latent_avg)  # the checkpoint's mean w, not one drawn afresh
    save_rosinality(tmp_path / "again.pt", again.generator, again.discriminator, again.latent_avg)
    assert torch.equal(_images(load_model(str(tmp_path / "again.pt")).generator), _images(generator))


def _to_nvidia(state: dict) -> dict:
    """The NVIDIA stylegan2-ada-pytorch names and shapes of a tiny generator (test-side inverse)."""
    nv = {}
    for i in range(TINY.n_mlp):
        nv[f"mapping.fc{i}.weight"], nv[f"mapping.fc{i}.bias"] = (
            state[f"style.{i + 1}.weight"],
            state[f"style.{i + 1}.bias"],
        )
    nv["synthesis.b4.const"] = state["input.input"][0]
    layers = {"conv1": "synthesis.b4.conv1", "to_rgb1": "synthesis.b4.torgb"}
    for k, res in enumerate((8, 16)):
        layers.update({f"convs.{2 * k}": f"synthesis.b{res}.conv0", f"convs.{2 * k + 1}": f"synthesis.b{res}.conv1",
                       f"to_rgbs.{k}": f"synthesis.b{res}.torgb"})  # fmt: skip
    for ours, theirs in layers.items():
        nv[f"{theirs}.weight"] = state[f"{ours}.conv.weight"][0]
        nv[f"{theirs}.affine.weight"] = state[f"{ours}.conv.modulation.weight"]
        nv[f"{theirs}.affine.bias"] = state[f"{ours}.conv.modulation.bias"]
        if "rgb" in ours:
            nv[f"{theirs}.bias"] = state[f"{ours}.bias"].reshape(3)
        else:
            nv[f"{theirs}.bias"] = state[f"{ours}.activate.bias"]
            nv[f"{theirs}.noise_strength"] = state[f"{ours}.noise.weight"][0]
    noise_layers = ["synthesis.b4.conv1", "synthesis.b8.conv0", "synthesis.b8.conv1", "synthesis.b16.conv0",
                    "synthesis.b16.conv1"]  # fmt: skip
    for i, layer in enumerate(noise_layers):
        nv[f"{layer}.noise_const"] = state[f"noises.noise_{i}"][0, 0]
    return nv


def _discriminator_to_nvidia(state: dict, size: int) -> dict:
    """NVIDIA's names of a tiny residual discriminator (test-side inverse)."""
    nv = {f"b{size}.fromrgb.weight": state["convs.0.0.weight"], f"b{size}.fromrgb.bias": state["convs.0.1.bias"]}
    res, k = size, 1
    while res > 4:
        nv[f"b{res}.conv0.weight"], nv[f"b{res}.conv0.bias"] = (
            state[f"convs.{k}.conv1.0.weight"],
            state[f"convs.{k}.conv1.1.bias"],
        )
        nv[f"b{res}.conv1.weight"], nv[f"b{res}.conv1.bias"] = (
            state[f"convs.{k}.conv2.1.weight"],
            state[f"convs.{k}.conv2.2.bias"],
        )
        nv[f"b{res}.skip.weight"] = state[f"convs.{k}.skip.1.weight"]
        res, k = res // 2, k + 1
    nv["b4.conv.weight"], nv["b4.conv.bias"] = state["final_conv.0.weight"], state["final_conv.1.bias"]
    for i, layer in enumerate(("fc", "out")):
        nv[f"b4.{layer}.weight"], nv[f"b4.{layer}.bias"] = (
            state[f"final_linear.{i}.weight"],
            state[f"final_linear.{i}.bias"],
        )
    return nv


@pytest.fixture
def persistence_module(monkeypatch):
    """A stand-in for NVIDIA's torch_utils.persistence, only so that pickle can *write* its references."""
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # what NVIDIA's loader would run: exec(meta["module_src"])
        raise AssertionError("the project must never call NVIDIA's reconstructor")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)
    return module


def _nvidia_gains(params: dict) -> dict:
    """The gains NVIDIA's layers keep as attributes: numpy float64 scalars, made the way its networks.py makes them."""
    if "weight" not in params:
        return {}
    lr_multiplier, in_features = 0.01, params["weight"][0].numel()
    return {"weight_gain": lr_multiplier / np.sqrt(in_features), "act_gain": np.sqrt(2)}  # lrelu's def_gain


def _persistent(module, class_name: str, params: dict, children: dict, source: str, buffers: dict | None = None):
    class Persistent:  # pickles exactly like an NVIDIA persistent_class instance
        def __reduce__(self):
            state = {"training": False, "_parameters": OrderedDict(params), "_buffers": OrderedDict(buffers or {}),
                     "_non_persistent_buffers_set": set(), "_modules": OrderedDict(children),
                     **_nvidia_gains(params)}  # fmt: skip
            meta = {"type": "class", "version": 6, "module_src": source, "class_name": class_name, "state": state}
            return (module._reconstruct_persistent_obj, (meta,))

    return Persistent()


# What NVIDIA's networks register as buffers, not parameters: a reader of `_parameters` alone would lose the mean w
# (the truncation centre) and the layers' fixed noise.
NVIDIA_BUFFERS = ("w_avg", "noise_const")


def _tree(module, nv: dict, source: str = "", prefix: str = "", name: str = "Generator"):
    """NVIDIA's nesting of persistent networks, over the tensors `nv` names."""
    names = {k[len(prefix) :] for k in nv if k.startswith(prefix)}
    params = {n: torch.nn.Parameter(nv[prefix + n]) for n in names if "." not in n and n not in NVIDIA_BUFFERS}
    buffers = {n: nv[prefix + n] for n in names if n in NVIDIA_BUFFERS}
    child_names = sorted({n.split(".")[0] for n in names if "." in n})
    children = {c: _tree(module, nv, source, f"{prefix}{c}.") for c in child_names}
    return _persistent(module, prefix or name, params, children, source, buffers)


def test_nvidia_pickle_loads_without_running_its_code(tmp_path, persistence_module):
    generator, discriminator = _tiny()
    nv = _to_nvidia(generator.state_dict())
    marker = tmp_path / "code-ran"
    source = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\n"

    def tree(nv: dict, name: str = "Generator"):
        return _tree(persistence_module, nv, source, name=name)

    path = tmp_path / "network-snapshot.pkl"
    with open(path, "wb") as f:
        pickle.dump({"G_ema": tree(nv), "training_set_kwargs": {"resolution": 16}}, f)
    assert b"multiarray" in path.read_bytes()  # the gains are numpy scalars, as in every genuine pickle
    model = load_model(str(path))
    assert not marker.exists()
    assert torch.equal(_images(model.generator), _images(generator))
    assert model.discriminator is None  # a pickle of G_ema alone

    # A training snapshot also holds the residual discriminator, which becomes ours weight for weight.
    with torch.no_grad():
        for name, p in discriminator.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    with open(path, "wb") as f:
        pickle.dump({"G_ema": tree(nv), "D": tree(_discriminator_to_nvidia(discriminator.state_dict(), 16),
                                                  name="Discriminator")}, f)  # fmt: skip
    model = load_model(str(path))
    images = _images(generator, seeds=range(4))
    with torch.no_grad():
        assert torch.equal(model.discriminator(images), discriminator(images))


@pytest.mark.parametrize("value", [np.dtype(object), np.str_("abc"), np.datetime64("2021-01-01")])
def test_numpy_values_other_than_plain_numbers_are_refused(tmp_path, value):
    path = tmp_path / "numpy.pkl"
    path.write_bytes(pickle.dumps({"G_ema": value}))
    with pytest.raises(InputError, match="refused numpy dtype"):
        load_model(str(path))


def test_unsupported_nvidia_generators_are_refused_in_one_line(tmp_path, persistence_module):
    nv = _to_nvidia(_tiny()[0].state_dict())
    path = tmp_path / "network-snapshot.pkl"
    labels = {"mapping.embed.weight": torch.randn(8, 10), "mapping.embed.bias": torch.zeros(8),
              "mapping.fc0.weight": torch.randn(8, 16)}  # c_dim=10 embedded to 8, concatenated to z  # fmt: skip
    path.write_bytes(pickle.dumps({"G_ema": _tree(persistence_module, {**nv, **labels})}))
    with pytest.raises(InputError, match="conditional StyleGAN2"):
        load_model(str(path))
    z_dim_16 = {**nv, "mapping.fc0.weight": torch.randn(8, 16)}  # z_dim 16, w_dim 8: not our mapping
    path.write_bytes(pickle.dumps({"G_ema": _tree(persistence_module, z_dim_16)}))
    with pytest.raises(InputError, match="weights do not match"):
        load_model(str(path))


def test_an_nvidia_pickle_without_weights_is_refused_in_one_line(tmp_path, persistence_module):
    path = tmp_path / "empty-snapshot.pkl"
    with open(path, "wb") as f:
        pickle.dump({"G_ema": _persistent(persistence_module, "Generator", {}, {}, "")}, f)
    with pytest.raises(InputError, match="its G_ema holds no StyleGAN2 generator weights"):
        load_model(str(path))


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_and_never_execute(tmp_path):
    marker = tmp_path / "pwned"
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"G_ema": _Exploit(marker)}))
    with pytest.raises(InputError, match="refused global"):
        load_model(str(pkl))
    pt = tmp_path / "evil.pt"
    torch.save({"g_ema": _Exploit(marker)}, pt)
    with pytest.raises(InputError, match="refused") as refusal:
        load_model(str(pt))
    # the reason is kept; torch's advice to allowlist the global (to run it) or to drop weights_only is not
    assert "system" in str(refusal.value)
    assert not any(word in str(refusal.value) for word in ("safe_globals", "allowlist", "weights_only"))
    assert not marker.exists()


# BUILD (setattr through a pickle's state) on the allow-listed tensor rebuilder: rewriting its defaults would
# negate every tensor any later weights-only load in the process rebuilt, although this load is refused.
_REWRITE_DEFAULTS = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__"
                     b"}X\x03\x00\x00\x00negq\x00\x88s\x85s\x86b.")


class _TensorWithHooks:
    def __reduce__(self):
        hooks = OrderedDict([(0, dict)])  # an allow-listed callable, handed over as a backward hook
        storage = torch.TypedStorage(3, dtype=torch.float32)  # the form NVIDIA's pickles hold
        return (torch._utils._rebuild_tensor_v2, (storage, 0, (3,), (1,), False, hooks))


class _ParameterWithHooks:
    def __reduce__(self):  # torch's own reduction of a Parameter, with a backward hook added
        return (torch._utils._rebuild_parameter, (torch.zeros(3), True, OrderedDict([(0, dict)])))


def test_a_pickle_cannot_change_allow_listed_functions_or_hand_over_hooks(tmp_path):
    defaults = torch._utils._rebuild_tensor_v2.__defaults__
    pkl = tmp_path / "rewrite.pkl"
    pkl.write_bytes(_REWRITE_DEFAULTS)
    with pytest.raises(InputError, match="refused to set the state of function"):
        load_model(str(pkl))
    assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults
    pkl.write_bytes(pickle.dumps({"G_ema": _TensorWithHooks()}))
    with pytest.raises(InputError, match="refused a tensor with backward hooks"):
        load_model(str(pkl))
    data = pickle.dumps(_ParameterWithHooks())  # a parameter's hooks are dropped: only its tensor is read
    parameter = RestrictedUnpickler(io.BytesIO(data), max_decoded_bytes=len(data)).load()
    assert isinstance(parameter, torch.nn.Parameter) and parameter.requires_grad and not parameter._backward_hooks
    generator, _ = _tiny()  # and the tensors loaded afterwards are what was saved
    torch.save({"g_ema": generator.state_dict(), "args": argparse.Namespace(size=16, latent=8, n_mlp=2)},
               tmp_path / "clean.pt")  # fmt: skip
    assert torch.equal(_images(load_model(str(tmp_path / "clean.pt")).generator), _images(generator))


class _Payload:
    """A storage as NVIDIA's pickles hold one: `torch.storage._load_from_bytes(torch-serialized bytes)`."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.payload,))


class _PayloadTensor:
    def __init__(self, payload: bytes, numel: int):
        self.payload, self.numel = payload, numel

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (_Payload(self.payload), 0, (self.numel,), (1,), False, OrderedDict()))


def test_a_nested_storage_payload_that_runs_code_is_refused_and_never_executes(tmp_path):
    """A storage's bytes are a torch file of their own, read by a second torch.load: that one is weights-only too,
    or code hidden one level down would run where the top-level pickle's is refused."""
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(_Exploit(marker), buffer)
    path = tmp_path / "nested-evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": _Payload(buffer.getvalue())}))
    with pytest.raises(InputError, match="refused to load") as refusal:
        read_nvidia_pickle(path)
    assert not marker.exists()
    assert "system" in str(refusal.value)  # the nested file's global is what is refused
    with pytest.raises(InputError, match="refused to load .*system"):
        load_model(str(path))
    assert not marker.exists()


def test_a_storage_payload_referenced_many_times_is_decoded_once(tmp_path, persistence_module):
    payload = torch.TypedStorage(256, dtype=torch.float32, _internal=True).__reduce__()[1][0]  # 1 KB, once in the file
    params = {f"w{i}": _PayloadTensor(payload, 256) for i in range(500)}  # each one a reference to the same bytes
    path = tmp_path / "shared.pkl"
    path.write_bytes(pickle.dumps({"G_ema": _persistent(persistence_module, "Generator", params, {}, "")}))
    tensors = flatten_record(read_nvidia_pickle(path)["G_ema"]).values()
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1  # not 500 decoded copies


def _deflated(data: bytes) -> bytes:
    """The same zip archive with compressed entries: torch's reader inflates them, torch.save never writes them."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as original, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as copy:
        for name in original.namelist():
            copy.writestr(name, original.read(name))
    return out.getvalue()


def test_compressed_zip_entries_are_refused_before_torch_inflates_them(tmp_path):
    generator, _ = _tiny()
    buffer = io.BytesIO()
    torch.save({"g_ema": generator.state_dict()}, buffer)
    (tmp_path / "deflated.pt").write_bytes(_deflated(buffer.getvalue()))
    with pytest.raises(InputError, match="compressed entries"):
        load_model(str(tmp_path / "deflated.pt"))
    buffer = io.BytesIO()
    torch.save(torch.TypedStorage(256, dtype=torch.float32, _internal=True), buffer)  # a zip, nested in a pickle
    (tmp_path / "nested.pkl").write_bytes(pickle.dumps({"G_ema": _PayloadTensor(_deflated(buffer.getvalue()), 256)}))
    with pytest.raises(InputError, match="compressed entries"):
        load_model(str(tmp_path / "nested.pkl"))


def test_a_file_in_torchs_older_format_loads_unless_it_declares_storages_it_does_not_hold(tmp_path):
    generator, _ = _tiny()
    buffer = io.BytesIO()
    torch.save({"g_ema": generator.state_dict(), "args": argparse.Namespace(size=16, latent=8, n_mlp=2)}, buffer,
               _use_new_zipfile_serialization=False)  # fmt: skip
    (tmp_path / "legacy.pt").write_bytes(buffer.getvalue())
    assert torch.equal(_images(load_model(str(tmp_path / "legacy.pt")).generator), _images(generator))
    (tmp_path / "hollow.pt").write_bytes(without_storage_bytes(buffer.getvalue()))
    with pytest.raises(InputError, match="hollow.pt: it declares 51 storage.s. whose bytes it does not hold"):
        load_model(str(tmp_path / "hollow.pt"))
    payload = torch.TypedStorage(256, dtype=torch.float32, _internal=True).__reduce__()[1][0]  # NVIDIA's: always so
    hollow = {"G_ema": _PayloadTensor(without_storage_bytes(payload), 256), "padding": bytes(4096)}  # so the
    (tmp_path / "hollow.pkl").write_bytes(pickle.dumps(hollow))  # file holds as many bytes as the storage declares
    with pytest.raises(InputError, match="whose bytes it does not hold"):
        load_model(str(tmp_path / "hollow.pkl"))


@pytest.mark.parametrize("declared", [
    {"size": 12}, {"size": "16"}, {"n_mlp": 17}, {"style_dim": 1025},
    {"channels": {"4": 8, "8": 8, "16": 1025}}, {"channels": [8, 8, 4]}, {"lr_mlp": 0}, {"lr_mlp": -0.01},
])  # fmt: skip
def test_an_architecture_beyond_the_limits_is_refused_before_it_is_built(tmp_path, declared):
    save_gan(tmp_path, _tiny()[0])
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, **declared}))
    with pytest.raises(InputError, match="unsupported StyleGAN2 architecture"):
        load_model(str(tmp_path))


def test_a_tiny_pt_cannot_declare_a_huge_generator(tmp_path):
    one = torch.zeros(1)  # every weight a stride-0 view of one number: a file of a few KB
    state = {"style.1.weight": one.expand(8, 8), "conv1.conv.weight": one.expand(1, 1025, 1025, 3, 3),
             "to_rgbs.0.bias": one, "convs.0.conv.weight": one.expand(1, 1025, 1025, 3, 3)}  # fmt: skip
    torch.save({"g_ema": state}, tmp_path / "huge.pt")
    with pytest.raises(InputError, match="channels at resolution 4 must be an integer from 1 to 1024"):
        load_model(str(tmp_path / "huge.pt"))


def test_broken_gan_files_are_refused_in_one_line(tmp_path):
    generator, discriminator = _tiny()
    save_gan(tmp_path / "folder", generator)
    (tmp_path / "folder" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(InputError, match="is not valid JSON"):
        load_model(str(tmp_path / "folder"))
    torch.save({"g_ema": generator.state_dict(), "d": list(discriminator.state_dict().values())}, tmp_path / "d.pt")
    with pytest.raises(InputError, match="discriminator weights do not match"):
        load_model(str(tmp_path / "d.pt"))


# --- the architecture against StyleGAN2's own definitions (the round trips above compare it only with itself) ---


def _per_sample_modulated_conv(layer, x, style):
    """rosinality's ModulatedConv2d, written out: each sample convolved with its own kernel, the weights scaled by
    the style per input channel and (demodulated) divided by their norm per output channel; an upsampling one is a
    stride-2 transposed convolution and then the [1, 3, 3, 1] blur (x 4, padded by 1)."""
    s = layer.modulation(style)
    out = []
    for n in range(len(x)):
        weight = layer.scale * layer.weight[0] * s[n][None, :, None, None]  # [out, in, k, k]
        if layer.demodulate:
            weight = weight / torch.sqrt(weight.pow(2).sum([1, 2, 3], keepdim=True) + 1e-8)
        if layer.upsample:
            y = F.conv_transpose2d(x[n : n + 1], weight.transpose(0, 1), stride=2)
            blur = torch.tensor([1.0, 3.0, 3.0, 1.0])
            blur = (blur[:, None] * blur[None, :] / 64 * 4).expand(y.shape[1], 1, 4, 4)
            y = F.conv2d(F.pad(y, (1, 1, 1, 1)), blur, groups=y.shape[1])
        else:
            y = F.conv2d(x[n : n + 1], weight, padding=layer.kernel // 2)
        out.append(y)
    return torch.cat(out)


@pytest.mark.parametrize("upsample", [False, True])
def test_modulated_convolution_is_stylegan2s_per_sample_convolution(upsample):
    torch.manual_seed(0)
    layer = ModulatedConv2d(4, 6, 3, 8, upsample=upsample)
    x, style = torch.randn(3, 4, 5, 5), torch.randn(3, 8)
    with torch.no_grad():
        ours, theirs = layer(x, style), _per_sample_modulated_conv(layer, x, style)
        assert ours.shape == theirs.shape == (3, 6, 10 if upsample else 5, 10 if upsample else 5)
        assert torch.allclose(ours, theirs, atol=1e-5)
        # demodulated: scaling a sample's style scales its kernel, not what it draws
        rescaled = ModulatedConv2d(4, 6, 3, 8, upsample=upsample)
        rescaled.load_state_dict(layer.state_dict())
        rescaled.modulation.weight.mul_(3.0)
        rescaled.modulation.bias.mul_(3.0)
        assert torch.allclose(rescaled(x, style), ours, atol=1e-5)


def test_the_skip_upsampling_is_bilinear_away_from_the_border():
    # StyleGAN2's [1, 3, 3, 1] filter doubles an image as bilinear interpolation does (half-pixel centres): the
    # ToRGB outputs add up across resolutions only if each is upsampled in place, with its brightness kept
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    ours = Upsample()(x)
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert ours.shape == (1, 3, 12, 12)
    assert torch.allclose(ours[..., 1:-1, 1:-1], bilinear[..., 1:-1, 1:-1], atol=1e-6)


def test_the_mapping_layers_activate_their_own_affine_output_with_the_learning_rate_multiplier():
    torch.manual_seed(0)
    activated = EqualLinear(8, 8, bias_init=0.5, lr_mul=0.01, activate=True)
    plain = EqualLinear(8, 8, lr_mul=0.01)
    plain.load_state_dict(activated.state_dict())
    with torch.no_grad():
        activated.bias.normal_(0, 30.0)  # stored at 1 / lr_mul of its effect, as the weights are
        plain.bias.copy_(activated.bias)
        x = torch.randn(4, 8)
        affine = plain(x)
        assert torch.allclose(affine, x @ (activated.weight * 0.01 / 8**0.5).T + activated.bias * 0.01, atol=1e-5)
        assert torch.allclose(activated(x), F.leaky_relu(affine, 0.2) * 2**0.5, atol=1e-5)


def test_each_layer_takes_its_own_w_plus_code():
    """rosinality's order: conv1 <- w0; to_rgb1 and the first up-convolution <- w1; then per resolution, the second
    convolution <- w(i+1) and its ToRGB with the next up-convolution <- w(i+2)."""
    generator, _ = _tiny()
    w_plus = torch.randn(1, generator.n_latent, 8).expand(2, -1, -1).clone()
    got = {}

    def recorder(name):
        def record(module, args):  # the style a layer's modulation is given
            got.setdefault(name, args[0])

        return record

    layers = {n: m for n, m in generator.named_modules() if isinstance(m, ModulatedConv2d)}
    for name, layer in layers.items():
        layer.modulation.register_forward_pre_hook(recorder(name))
    with torch.no_grad():
        generator.synthesis(w_plus)
    index = {name: next(i for i in range(generator.n_latent) if torch.equal(got[name], w_plus[:, i]))
             for name in layers}  # fmt: skip
    assert index == {"conv1.conv": 0, "to_rgb1.conv": 1, "convs.0.conv": 1, "convs.1.conv": 2, "to_rgbs.0.conv": 3,
                     "convs.2.conv": 3, "convs.3.conv": 4, "to_rgbs.1.conv": 5}  # fmt: skip
    assert generator.n_latent == 6


def test_truncation_moves_w_towards_the_mean_by_its_factor():
    generator, _ = _tiny()
    mean = generator.mean_latent(64)
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    noise = generator.fixed_noise()
    with torch.no_grad():
        w = generator.mapping(z)
        for psi in (0.0, 0.3):  # 0: every z draws the mean's image
            truncated = generator(z, psi, mean, randomize_noise=False)
            assert torch.allclose(truncated, generator.synthesis(mean + psi * (w - mean), noise), atol=1e-6)


def test_a_gan_models_images_are_its_generators_output_clamped_into_the_unit_range():
    # the generator draws past [-1, 1]: what the pool's detectors, CLIP and the metrics see is cut to [0, 1]
    model = load_model("digits-gan")
    z = model.latents(range(8))
    with torch.no_grad():
        raw, images = model.generator(z, randomize_noise=False), model.images(z)
    assert raw.min() < -1 and images.min() == 0 and images.max() <= 1
    inside = raw.abs() <= 1
    assert torch.allclose(images[inside], (raw[inside] + 1) / 2, atol=1e-6)


def test_default_channels_are_stylegan2_config_f():
    assert default_channels(1024) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64,
                                      1024: 32}  # fmt: skip
    assert default_channels(64, channel_multiplier=1) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 256}


def test_a_residual_block_scales_its_sum_by_one_over_root_two():
    # both ports (NVIDIA's gain=sqrt(0.5) on each branch, rosinality's / sqrt(2)): the sum keeps its variance
    torch.manual_seed(0)
    block = ResBlock(4, 8)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(block(x), (block.conv2(block.conv1(x)) + block.skip(x)) / math.sqrt(2), atol=1e-6)


def test_an_nvidia_pickles_mean_w_is_the_models_truncation_centre(tmp_path, persistence_module):
    generator, _ = _tiny()
    w_avg = torch.randn(8, generator=torch.Generator().manual_seed(5))  # mapping.w_avg, a buffer NVIDIA tracks
    nv = {**_to_nvidia(generator.state_dict()), "mapping.w_avg": w_avg}
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(pickle.dumps({"G_ema": _tree(persistence_module, nv)}))
    model = load_model(str(path))
    assert torch.equal(model.latent_avg, w_avg[None])  # not a mean drawn afresh from the mapping


@pytest.mark.parametrize("length", [4, 16])
def test_a_mean_w_of_another_length_than_style_dim_is_refused(tmp_path, length):
    generator, _ = _tiny()
    torch.save({"g_ema": generator.state_dict(), "latent_avg": torch.zeros(length)}, tmp_path / "bad-mean.pt")
    with pytest.raises(InputError, match="its mean w .latent_avg. is not a vector of style_dim=8 numbers"):
        load_model(str(tmp_path / "bad-mean.pt"))


def test_the_minibatch_stddev_feature_is_each_groups_population_deviation():
    """rosinality's and NVIDIA's layer: sample j grouped with j + m, j + 2m, ... (m = batch / group), the standard
    deviation over the group (dividing by its size, not size - 1), averaged over channels and pixels."""
    _, discriminator = _tiny()
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = {}

    def record(module, args):
        seen["input"] = args[0]

    discriminator.final_conv.register_forward_pre_hook(record)
    with torch.no_grad():
        discriminator(images)
        features = discriminator.convs(images)  # [8, C, 4, 4]
    groups = features.view(4, 2, *features.shape[1:])  # groups of 4 (the default): [group member, m, C, 4, 4]
    deviation = torch.sqrt(((groups - groups.mean(0)) ** 2).mean(0) + 1e-8).mean([1, 2, 3])  # [m]
    assert torch.allclose(seen["input"][:, -1], deviation.repeat(4)[:, None, None].expand(8, 4, 4), atol=1e-6)
    assert torch.equal(seen["input"][:, :-1], features)


def test_a_pt_whose_zip_declares_more_bytes_than_it_holds_or_that_was_cut_short_is_refused(tmp_path):
    generator, _ = _tiny()
    buffer = io.BytesIO()
    torch.save({"g_ema": generator.state_dict()}, buffer)
    data = bytearray(buffer.getvalue())
    entry = data.find(b"PK\x01\x02")  # the zip directory's first entry: its uncompressed size at bytes 24-27
    data[entry + 24 : entry + 28] = (2**31).to_bytes(4, "little")  # 2 GB declared, stored in a few hundred bytes
    (tmp_path / "inflated.pt").write_bytes(bytes(data))
    with pytest.raises(InputError, match="its entries declare more bytes than the file holds"):
        load_model(str(tmp_path / "inflated.pt"))
    (tmp_path / "cut.pt").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # a full disk cut it short
    with pytest.raises(InputError, match="cannot read .*cut.pt: not a readable zip archive"):
        load_model(str(tmp_path / "cut.pt"))

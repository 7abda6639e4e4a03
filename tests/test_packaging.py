"""Installing and running next to other packages: the distribution, the command's manners (version,
device, pipes, logging, permissions), reproducible configs, and run folders that fit real model sizes."""

import json
import os
import shutil
import stat
import subprocess
import sys
from importlib.metadata import distribution

import pytest
import torch

from erasure import DISTRIBUTION, __version__
from pipelines.errors import InputError
from pipelines.zoo import models as zoo

ESD_TINY = ["--method", "esd", "--concept", "a cat", "--set", "steps=2", "--set", "ddim_steps=3", "--quiet"]


def run(*args, cwd=None, umask=None):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "erasure", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, preexec_fn=preexec, timeout=600)  # fmt: skip


def test_the_distribution_carries_its_licence_and_declares_what_the_code_imports():
    dist = distribution(DISTRIBUTION)
    assert dist.metadata["License-Expression"] == "Apache-2.0"
    licence = [f for f in dist.files or [] if f.name == "LICENSE"]
    assert licence and "Apache License" in licence[0].read_text()
    declared = {req.split(">")[0].split("=")[0].split("[")[0].strip().lower() for req in dist.requires or []}
    for needed in (
        "torch",
        "torchvision",
        "diffusers",
        "transformers",
        "accelerate",
        "open-clip-torch",
        "pandas",
        "torchmetrics",
    ):
        assert needed in declared


@pytest.mark.slow
def test_python_dash_m_and_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"erasure {__version__} ({DISTRIBUTION})"
    result = run("methods")
    assert result.returncode == 0 and "advunlearn" in result.stdout


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "erasure", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)  # fmt: skip
    proc.stdout.close()  # the reader is gone before the first line is written, as with `| head -0`
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == b""


@pytest.mark.slow
def test_auto_device_is_the_cpu_on_a_machine_without_cuda():
    from pipelines.devices import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    for bad, message in [("foo", "unknown device"), ("cuda", "CUDA is not available"), ("mps", "not supported")]:
        with pytest.raises(InputError, match=message):
            resolve_device(bad)


def test_a_cuda_device_index_counts_from_0_below_the_machines_device_count(monkeypatch):
    # refused before any model loads: on a machine of 2 GPUs, cuda:1 is the last one and cuda:2 does not exist
    from pipelines.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("auto") == "cuda"
    assert resolve_device(" CUDA:1") == "cuda:1"  # as torch.device takes it, later, after the models have loaded
    with pytest.raises(InputError, match="this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_loading_leaves_the_libraries_verbosity_alone(tiny_pipeline_dir):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from pipelines import load_model

    transformers_logging.set_verbosity_info()
    diffusers_logging.set_verbosity_warning()
    try:
        load_model(str(tiny_pipeline_dir))
        assert transformers_logging.get_verbosity() == transformers_logging.INFO
        assert diffusers_logging.get_verbosity() == diffusers_logging.WARNING
        assert transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.set_verbosity_warning()


@pytest.mark.slow
def test_show_config_needs_no_concept_and_round_trips_through_config(tiny_pipeline_dir, tmp_path):
    shown = run("erase", "--method", "sfd", "--show-config")
    assert shown.returncode == 0, shown.stderr
    assert "steps: 300" in shown.stdout and "[paper default: 2000]" in shown.stdout  # digits preset
    (tmp_path / "sfd.yaml").write_text(shown.stdout)
    again = run("erase", "--method", "sfd", "--config", str(tmp_path / "sfd.yaml"), "--show-config")
    assert again.returncode == 0 and again.stdout == shown.stdout

    edited = shown.stdout.replace("steps: 300", "steps: 7")
    (tmp_path / "sfd.yaml").write_text(edited)
    again = run("erase", "--method", "sfd", "--config", str(tmp_path / "sfd.yaml"), "--show-config",
                "--set", "prompt_templates=['a photo of {}, in a museum', '{}']")  # fmt: skip
    assert "steps: 7" in again.stdout
    assert "prompt_templates: ['a photo of {}, in a museum', '{}']" in again.stdout

    sd = run("erase", "--method", "esd", "--model", str(tiny_pipeline_dir), "--show-config")
    assert "steps: 1000" in sd.stdout  # the paper's value for a Stable-Diffusion-family model
    assert run("erase", "--method", "esd").stderr.startswith("error: --concept is needed")


@pytest.mark.slow
def test_a_run_is_reproduced_from_its_erasure_json_and_its_files_are_readable_by_others(tiny_pipeline_dir, tmp_path):
    first = run("erase", *ESD_TINY, "--model", str(tiny_pipeline_dir), "--seed", "3", "--out", "first", cwd=tmp_path,
                umask=0o002)  # fmt: skip
    assert first.returncode == 0, first.stderr
    for path in [tmp_path / "first", *(tmp_path / "first").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o775, path
        elif path.stat().st_nlink == 1:  # linked base files keep the base's mode
            assert mode == 0o664, path

    again = run("erase", "--config", "first/erasure.json", "--out", "again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    a, b = (json.loads((tmp_path / name / "erasure.json").read_text()) for name in ("first", "again"))
    for key in ("method", "concepts", "seed", "config"):
        assert a[key] == b[key]
    assert b["base_model"]["sha256"] == a["base_model"]["sha256"]
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "first" / weights).read_bytes() == (tmp_path / "again" / weights).read_bytes()


def _files_size(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_unchanged_components_are_the_base_files_and_a_changed_only_run_loads_them(tiny_pipeline_dir, tmp_path,
                                                                                   capsys):  # fmt: skip
    from pipelines import load_model
    from ui.cli import main  # in-process: a process of its own spends 2-3 s on imports

    base = tmp_path / "base"
    shutil.copytree(tiny_pipeline_dir, base)
    for mode in ("full", "changed"):
        assert main(["erase", *ESD_TINY, "--model", str(base), "--save", mode, "--out", str(tmp_path / mode)]) == 0
    full, changed = tmp_path / "full", tmp_path / "changed"

    stored = json.loads((full / "erasure.json").read_text())["stored_components"]
    assert stored == {"vae": "linked", "text_encoder": "linked", "tokenizer": "linked", "unet": "saved",
                      "scheduler": "linked"}  # fmt: skip
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for file in (base / part).iterdir():
            assert (full / part / file.name).read_bytes() == file.read_bytes()
    assert sorted(p.name for p in changed.iterdir() if p.is_dir()) == ["unet"]
    assert _files_size(changed) - _files_size(changed / "unet") < 8_000  # the rest is a few small JSON files

    images = [load_model(str(run_dir)).generate(["a cat"], [0, 1], steps=3)[0] for run_dir in (full, changed)]
    for a, b in zip(*images):
        assert a.tobytes() == b.tobytes()

    tampered = base / "vae" / "config.json"
    tampered.write_text(tampered.read_text().replace('"sample_size": 16', '"sample_size": 32'))
    capsys.readouterr()
    assert main(["sample", str(changed), "--prompt", "a cat", "--out", str(tmp_path / "g.png")]) == 2
    assert "has changed since the run was saved" in capsys.readouterr().err
    shutil.rmtree(base)
    assert main(["sample", str(changed), "--prompt", "a cat", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "is no longer there" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "g.png").exists()
    assert load_model(str(full)).unet is not None  # the full run does not depend on its base


def test_a_component_taken_from_the_base_is_made_of_links_to_its_files_and_leaves_out_pickled_weights(tmp_path):
    """Loading reads the safetensors of a component that also has a pickled copy: the copy is left out, so that the run
    neither holds a file nobody loads nor carries a pickle into its digest."""
    from pipelines.components import link_folder

    base = tmp_path / "base" / "unet"
    base.mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        (base / name).write_bytes(name.encode())
    link_folder(base, tmp_path / "run" / "unet")
    linked = sorted((tmp_path / "run" / "unet").iterdir())
    assert [p.name for p in linked] == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert all(os.path.samefile(p, base / p.name) for p in linked)


def test_a_base_part_with_a_pickled_copy_is_linked_and_an_embedded_base_is_named(tiny_pipeline_dir, tmp_path):
    """Hub repositories often hold `.bin` copies beside the safetensors: the component is still the base's own files
    (re-serialised, fp16 weights would become fp32). A `changed` run refers to an embedded base by its name: its
    installed path changes with each environment."""
    from pipelines import load_model, resolve
    from pipelines.components import base_spec, save_pipeline

    base = tmp_path / "base"
    shutil.copytree(tiny_pipeline_dir, base)
    (base / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"a pickled copy, never read")
    pipe = load_model(str(tiny_pipeline_dir)).pipe
    stored = save_pipeline(pipe, tmp_path / "run", changed=["unet"], source=resolve(str(base)))
    assert stored["vae"] == "linked" and stored["unet"] == "saved"
    assert sorted(p.name for p in (tmp_path / "run" / "vae").iterdir()) == sorted(
        p.name for p in (base / "vae").iterdir() if p.suffix != ".bin")  # fmt: skip
    assert base_spec(resolve("digits-sd")) == "digits-sd" and base_spec(resolve("digits")) == "digits"
    assert base_spec(resolve(str(base))) == str(base.resolve())


def test_a_changed_run_of_a_hub_model_reads_the_snapshot_it_was_made_from(tiny_pipeline_dir, tmp_path, monkeypatch):
    """A Hub id in the local cache (huggingface_hub's layout: refs/main names the snapshot) is a base like any other;
    once the repository moves on, a `--save changed` run takes the snapshot it recorded while the cache holds it."""
    import huggingface_hub.constants

    from erasure.api import erase
    from pipelines import load_model

    repo = tmp_path / "cache" / "models--someone--tiny-sd"
    first, second = "a" * 40, "b" * 40
    shutil.copytree(tiny_pipeline_dir, repo / "snapshots" / first)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = erase("esd", ["a cat"], "someone/tiny-sd", out=tmp_path / "run", save="changed", progress=False,
                    sets=["steps=1", "ddim_steps=2"])  # fmt: skip
    assert json.loads((run_dir / "erasure_base.json").read_text())["revision"] == first
    drawn = load_model(str(run_dir)).generate(["a cat"], [0], steps=2)[0][0].tobytes()

    shutil.copytree(repo / "snapshots" / first, repo / "snapshots" / second)  # a new commit changes the VAE
    config = repo / "snapshots" / second / "vae" / "config.json"
    config.write_text(config.read_text().replace('"sample_size": 16', '"sample_size": 32'))
    (repo / "refs" / "main").write_text(second)
    assert load_model(str(run_dir)).generate(["a cat"], [0], steps=2)[0][0].tobytes() == drawn
    shutil.rmtree(repo / "snapshots" / first)  # gone from the cache: the run cannot be drawn as it was
    with pytest.raises(InputError, match="has changed since the run was saved"):
        load_model(str(run_dir))


@pytest.mark.slow
def test_save_changed_is_refused_for_a_gan_before_any_work(tmp_path):
    result = run("erase", "--method", "text2unlearn", "--model", "digits-gan", "--concept", "seven",
                 "--save", "changed", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "--save changed needs a base saved as a diffusers pipeline" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_advunlearn_run_of_digits_sd_is_the_base_plus_its_text_encoder(tmp_path):
    base = zoo.embedded_path("digits-sd")
    sets = ["--set", "steps=1", "--set", "bank_size=0", "--set", "ddim_steps=2", "--set", "batch_size=2",
            "--set", "retain_batch=2", "--quiet"]  # what it trains does not matter here, only what it saves
    for mode in ("full", "changed"):
        result = run("erase", "--method", "advunlearn", "--concept", "seven", *sets, "--save", mode, "--out", mode,
                     cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr
    encoder = _files_size(tmp_path / "full" / "text_encoder")
    assert _files_size(tmp_path / "full") <= _files_size(base) + encoder
    assert _files_size(tmp_path / "changed") <= encoder + 8_000
    # the unchanged UNet keeps the base's fp16 file
    for file in (base / "unet").iterdir():
        assert (tmp_path / "full" / "unet" / file.name).read_bytes() == file.read_bytes()


def test_shipped_weights_are_small_files_and_shard_indexes_tell_the_truth():
    # (the old shards carried an index whose total_size counted the float32 bytes before the fp16 conversion)
    from safetensors import safe_open

    root = zoo.SHIPPED_ROOT
    assert all(p.stat().st_size < 8 * 2**20 for p in root.rglob("*.safetensors"))
    indexes = list((root / "digits-sd").rglob("*.safetensors.index.json"))
    assert indexes  # the UNet is sharded to keep every file under 8 MB
    for index in indexes:
        data = json.loads(index.read_text())
        size = 0
        for shard in set(data["weight_map"].values()):
            with safe_open(str(index.parent / shard), "pt") as f:
                assert set(f.keys()) == {k for k, v in data["weight_map"].items() if v == shard}
                size += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
        assert data["metadata"]["total_size"] == size, index


def test_the_code_passes_the_projects_own_lint_settings():
    # ruff comes with the dev extra; its settings (pyproject.toml) are the project's style, so a change that
    # breaks them fails here rather than piling up unnoticed.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", root],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

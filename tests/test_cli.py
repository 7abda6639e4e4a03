"""The command line end to end, in a subprocess as a user runs it."""

import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

ERASURE = [sys.executable, "-m", "erasure"]


def run(*args, cwd=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([*ERASURE, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def test_help_is_instant_and_lists_the_commands():
    started = time.time()
    result = run("--help")
    assert result.returncode == 0
    for command in ("erase", "eval", "sample", "preview", "export", "methods", "zoo"):
        assert command in result.stdout
    assert time.time() - started < 5  # includes interpreter start; no torch import
    check = subprocess.run(
        [sys.executable, "-c", "import sys, ui.cli; ui.cli.build_parser(); print('torch' in sys.modules)"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.stdout.strip() == "False"


def test_methods_lists_every_method_with_its_paper():
    result = run("methods")
    assert result.returncode == 0
    for key in ("esd", "advunlearn", "fewshot", "sfd", "text2unlearn", "adapt-unlearn"):
        assert key in result.stdout
    assert "arxiv.org" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["erase", "--method", "esd", "--concept", "cat", "--model", "/no/such/dir"], "no such path"),
        (["erase", "--method", "esd", "--concept", "", "--model", "{tiny}"], "a concept is empty"),
        (["erase", "--method", "esd", "--concept", "cat", "--model", "{tiny}", "--set", "lr=fast"], "not a number"),
        (
            ["erase", "--method", "esd", "--concept", "cat", "--model", "{tiny}", "--set", "colour=red"],
            "unknown option",
        ),
        (["erase", "--method", "sfd", "--concept", "cat", "--model", "{tiny}"], "pass --set override=TEXT"),
        (["erase", "--method", "fewshot", "--concept", "cat", "--model", "{tiny}"], "pass --images DIR"),
        (["erase", "--method", "esd", "--concept", "cat", "--model", "{empty}"], "not a model folder"),
        (["erase", "--method", "esd", "--concept", "cat", "--model", "{tiny}", "--device", "cuda"], "CUDA"),
        (["sample", "{tiny}", "--out", "{out}/g.png"], "at least one --prompt"),
        (["eval", "{tiny}", "--concept", "cat"], "--baseline is needed"),
        (["preview", "--erased", "{empty}"], "not an erased run folder"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(args, message, tiny_pipeline_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    args = [a.format(tiny=tiny_pipeline_dir, empty=tmp_path / "empty", out=tmp_path) for a in args]
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing half-written


@pytest.mark.slow
def test_corrupt_weights_give_one_line(tiny_pipeline_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    weights = next((broken / "text_encoder").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    result = run("erase", "--method", "esd", "--concept", "cat", "--model", str(broken), cwd=tmp_path)
    assert result.returncode == 2 and "corrupt safetensors" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_erase_then_sample_grid_and_folder(tiny_pipeline_dir, tmp_path):
    sets = ["--set", "steps=2", "--set", "ddim_steps=3"]
    result = run("erase", "--method", "esd", "--concept", "a cat", "--model", str(tiny_pipeline_dir),
                 "--out", str(tmp_path / "run"), "--quiet", *sets)  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "run" / "erasure.json").read_text())
    assert manifest["config"]["steps"] == 2

    result = run("sample", str(tmp_path / "run"), "--prompt", "a cat", "--prompt", "a dog", "--n", "3",
                 "--seed", "5", "--steps", "2", "--out", str(tmp_path / "grid.png"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 3 * 96 and grid.height > 2 * 96  # 2 rows x 3 seeds of upscaled 16x16 images

    result = run("sample", str(tmp_path / "run"), "--prompt", "a cat", "--prompt", "a dog", "--n", "2",
                 "--seed", "5", "--steps", "2", "--out", str(tmp_path / "images"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == ["p0_s5.png", "p0_s6.png", "p1_s5.png", "p1_s6.png"]
    assert Image.open(tmp_path / "images" / "p1_s6.png").size == (16, 16)

    from ui.cli import main  # a grid in the format its name says, in-process

    for name, image_format in (("grid.jpg", "JPEG"), ("grid.webp", "WEBP")):
        assert main(["sample", str(tmp_path / "run"), "--prompt", "a cat", "--n", "1", "--steps", "2",
                     "--out", str(tmp_path / name)]) == 0  # fmt: skip
        assert Image.open(tmp_path / name).format == image_format


@pytest.mark.slow
def test_sample_embedded_models(tmp_path):
    result = run("sample", "--prompt", "a red seven", "--n", "3", "--seed", "0", "--steps", "5",
                 "--out", str(tmp_path / "digits.png"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "digits.png").width >= 3 * 96
    result = run("sample", "digits-gan", "--n", "10", "--seed", "3", "--out", str(tmp_path / "gan.png"))
    assert result.returncode == 0, result.stderr
    grid = Image.open(tmp_path / "gan.png")
    assert grid.height > 2 * 96 and grid.width > 8 * 96  # two rows of eight and two
    result = run("sample", "digits-gan", "--n", "2", "--seed", "3", "--out", str(tmp_path / "gan"))
    assert sorted(p.name for p in (tmp_path / "gan").iterdir()) == ["s3.png", "s4.png"]
    result = run("sample", "digits-gan", "--prompt", "a seven", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "takes no --prompt" in result.stderr


@pytest.mark.slow
def test_options_are_never_abbreviated(tiny_pipeline_dir, tmp_path):
    # `--model` is not an option of `sample` (the model is positional); it must not become --model-config
    result = run("sample", "--model", str(tiny_pipeline_dir), "--prompt", "a cat", "--out", str(tmp_path / "g.png"),
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "unrecognized arguments: --model" in result.stderr
    assert not (tmp_path / "g.png").exists()

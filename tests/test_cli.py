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
    for command in ("erase", "eval", "compare", "sample", "preview", "export", "methods", "zoo"):
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

    from pipelines.diffusion import SD_SAMPLING
    from ui.cli import main  # the rest in-process (a process of its own spends 2-3 s on imports)

    assert main(["sample", str(tmp_path / "run"), "--prompt", "a cat", "--prompt", "a dog", "--n", "2",
                 "--seed", "5", "--out", str(tmp_path / "images")]) == 0  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == ["p0_s5.png", "p0_s6.png", "p1_s5.png", "p1_s6.png", "sample.json"]
    assert Image.open(tmp_path / "images" / "p1_s6.png").size == (16, 16)
    record = json.loads((tmp_path / "images" / "sample.json").read_text())
    assert record["model"] == str(tmp_path / "run") and record["prompts"] == ["a cat", "a dog"]
    assert record["images"]["p1_s6.png"] == {"prompt": 1, "seed": 6}
    # the model's own steps and guidance, recorded where not given
    assert record["steps"] == SD_SAMPLING["steps"] and record["guidance"] == SD_SAMPLING["guidance"]
    # another model's images would sit beside these under the same names: refused before anything is drawn
    assert main(["sample", str(tmp_path / "run"), "--prompt", "a dog", "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "images")]) == 2  # fmt: skip
    assert len(list((tmp_path / "images").iterdir())) == 5

    # grids/ is made, as erase's --out; a suffix in capitals is a grid too
    for name, image_format in (("grid.jpg", "JPEG"), ("grid.webp", "WEBP"), ("grid.PNG", "PNG")):
        assert main(["sample", str(tmp_path / "run"), "--prompt", "a cat", "--n", "1", "--steps", "2",
                     "--out", str(tmp_path / "grids" / name)]) == 0  # fmt: skip
        assert Image.open(tmp_path / "grids" / name).format == image_format


@pytest.mark.slow
def test_sample_embedded_models(tmp_path):
    result = run("sample", "--prompt", "a red seven", "--n", "3", "--seed", "0", "--steps", "5",
                 "--out", str(tmp_path / "digits.png"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "digits.png").width >= 3 * 96
    from ui.cli import main  # the GAN in-process (a process of its own spends 2-3 s on imports)

    assert main(["sample", "digits-gan", "--n", "10", "--seed", "3", "--out", str(tmp_path / "gan.png")]) == 0
    grid = Image.open(tmp_path / "gan.png")
    assert grid.height > 2 * 96 and grid.width > 8 * 96  # two rows of eight and two
    assert main(["sample", "digits-gan", "--n", "2", "--seed", "3", "--out", str(tmp_path / "gan")]) == 0
    assert sorted(p.name for p in (tmp_path / "gan").iterdir()) == ["s3.png", "s4.png", "sample.json"]
    assert json.loads((tmp_path / "gan" / "sample.json").read_text())["images"]["s4.png"] == {"prompt": None, "seed": 4}


def test_sample_writes_into_an_empty_folder_the_user_made_for_it(tmp_path):
    from ui.cli import main

    # only a folder holding files is refused (images of another model could sit beside these); an empty one is used
    (tmp_path / "samples").mkdir()
    assert main(["sample", "digits-gan", "--n", "2", "--seed", "3", "--out", str(tmp_path / "samples")]) == 0
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["s3.png", "s4.png", "sample.json"]


def test_a_gan_sampled_without_truncation_draws_from_the_whole_distribution(tmp_path):
    from ui.cli import main

    # no --truncation is truncation 1.0 (none): the same images as asking for 1.0, other images than a truncated draw
    drawn = {}
    for name, extra in (("default", []), ("full", ["--truncation", "1.0"]), ("truncated", ["--truncation", "0.5"])):
        assert main(["sample", "digits-gan", "--n", "2", "--seed", "3", "--out", str(tmp_path / name), *extra]) == 0
        drawn[name] = [Image.open(tmp_path / name / f"s{s}.png").tobytes() for s in (3, 4)]
    assert drawn["default"] == drawn["full"] and drawn["default"] != drawn["truncated"]


def test_ctrl_c_before_any_checkpoint_exits_with_the_shells_code_for_sigint(tmp_path, monkeypatch, capsys):
    import erasure.sampling
    from ui.cli import main

    # nothing to resume: one "interrupted" line and 130 (128 + SIGINT), as a shell reports a command Ctrl-C stopped
    def pressed_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(erasure.sampling, "sample", pressed_ctrl_c)
    assert main(["sample", "digits-gan", "--n", "1", "--out", str(tmp_path / "gan.png")]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_a_stopped_runs_exit_code_is_the_shells_for_the_signal_that_stopped_it():
    import signal

    from erasure.training import Terminated
    from ui.cli import _interrupted_exit_code

    assert _interrupted_exit_code(Terminated("stopped", signal.SIGTERM)) == 143  # kill, a scheduler's preemption
    assert _interrupted_exit_code(Terminated("stopped", signal.SIGHUP)) == 129  # the terminal closed
    assert _interrupted_exit_code(KeyboardInterrupt()) == 130
    assert _interrupted_exit_code(RuntimeError("no signal")) == 1


def test_a_run_erased_again_from_its_erasure_json_takes_its_seed_unless_one_is_given(tiny_pipeline_dir, tmp_path):
    from erasure.api import erase
    from ui.cli import main

    first = erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "first", seed=3, progress=False,
                  sets=["steps=1", "ddim_steps=2"])  # fmt: skip
    manifest = str(first / "erasure.json")
    assert main(["erase", "--config", manifest, "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert main(["erase", "--config", manifest, "--seed", "4", "--out", str(tmp_path / "other"), "--quiet"]) == 0
    seeds = [json.loads((tmp_path / name / "erasure.json").read_text())["seed"] for name in ("first", "again", "other")]
    assert seeds == [3, 3, 4]


def test_sample_asks_for_yes_only_above_its_limit_of_images(tmp_path, capsys):
    from ui.cli import CONFIRM_IMAGES, main

    # the limit itself is drawn without --yes; one image more asks first
    assert main(["sample", "digits-gan", "--n", str(CONFIRM_IMAGES + 1), "--out", str(tmp_path / "more")]) == 2
    assert "pass --yes" in capsys.readouterr().err and not (tmp_path / "more").exists()
    assert main(["sample", "digits-gan", "--n", str(CONFIRM_IMAGES), "--out", str(tmp_path / "limit")]) == 0
    assert len(list((tmp_path / "limit").glob("s*.png"))) == CONFIRM_IMAGES


def test_an_unexpected_failure_exits_1_with_one_line_apart_from_bad_input(tmp_path, monkeypatch, capsys):
    import erasure.sampling
    from ui.cli import main

    # bad input ends with exit code 2; any other failure with 1, so that a script calling erasure tells them apart
    def failing(*args, **kwargs):
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(erasure.sampling, "sample", failing)
    assert main(["sample", "digits-gan", "--n", "1", "--out", str(tmp_path / "gan.png")]) == 1
    err = capsys.readouterr().err
    assert err == "error: RuntimeError: the disk went away (rerun as `erasure --debug sample ...` for the traceback)\n"
    # the rerun it names shows the traceback
    with pytest.raises(RuntimeError, match="the disk went away"):
        main(["--debug", "sample", "digits-gan", "--n", "1", "--out", str(tmp_path / "gan.png")])


def test_eval_hands_every_attack_option_to_the_evaluation(monkeypatch, capsys):
    # each attack given (repeated --attack), and its steps, seeds and prompts, reach run_eval; 0 steps are refused
    import erasure.evaluation
    from pipelines.errors import InputError
    from ui.cli import main

    given = {}

    def recording(target, **kwargs):
        given.update(kwargs)
        raise InputError("recorded")

    monkeypatch.setattr(erasure.evaluation, "run_eval", recording)
    assert main(["eval", "digits", "--attack", "embedding", "--attack", "unlearndiffatk", "--attack-steps", "3",
                 "--attack-seeds", "2", "--attack-prompts", "1"]) == 2  # fmt: skip
    assert given["attack"] == ["embedding", "unlearndiffatk"]
    assert (given["attack_steps"], given["attack_seeds"], given["attack_prompts"]) == (3, 2, 1)
    with pytest.raises(SystemExit) as refused:
        main(["eval", "digits", "--attack", "embedding", "--attack-steps", "0"])
    assert refused.value.code == 2 and "argument --attack-steps: must be >= 1" in capsys.readouterr().err

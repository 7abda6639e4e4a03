"""Bad or hostile input through the command line, as a user types it: every case must end with exit code 2
and one `error:` line, no traceback, nothing left behind, and - unless reading the file is the check - no
model loaded (the commands run with `-v`, which logs each model load)."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from erasure.api import erase

TOO_BIG_SEED = str(2**70)


def run(*args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "erasure", "-v", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)  # fmt: skip


ESD = ["erase", "--method", "esd", "--concept", "cat", "--model", "{tiny}"]
# (arguments, what the error line says, whether reading a model file is the check itself)
CASES = [
    ([*ESD, "--set", "negative_guidance=nan"], "negative_guidance must be a finite number, not nan", False),
    ([*ESD, "--set", "lr=inf"], "lr must be a finite number, not inf", False),
    ([*ESD, "--set", "lr=nan"], "lr must be a finite number", False),
    ([*ESD, "--set", "lr=-1"], "lr must be > 0, not -1", False),
    # a run that diverges ends in its one line, under its closed progress bar, and leaves no run folder
    ([*ESD, "--set", "steps=1", "--set", "ddim_steps=2", "--set", "negative_guidance=1e38"],
     "training diverged at step 1", True),
    ([*ESD, "--set", "ddim_steps=5000"], "ddim_steps must be between 2 and 999, not 5000", False),
    ([*ESD[:2], "advunlearn", *ESD[3:], "--set", "attack_samples=sometimes"],
     "bad value for attack_samples: 'sometimes'; choose one of: redrawn, iteration", False),
    ([*ESD[:2], "stereo", *ESD[3:], "--set", "inversion_weight_decay=nan"],
     "inversion_weight_decay must be a finite number, not nan", False),
    ([*ESD[:2], "stereo", *ESD[3:], "--set", "inversion_weight_decay=-1"],
     "inversion_weight_decay must be >= 0", False),
    ([*ESD[:2], "stereo", *ESD[3:], "--set", "inversion_init=  "], "inversion_init must be a word", False),
    ([*ESD, "--set", "steps=0"], "steps must be >= 1", False),
    ([*ESD, "--set", "prompt_templates=a photo of {{}}, in a museum"], "'in a museum' must contain '{}'", False),
    ([*ESD, "--seed", "-1"], "argument --seed: must be between 0 and 4294967295, not -1", False),
    ([*ESD, "--seed", TOO_BIG_SEED], "argument --seed: must be between 0 and 4294967295", False),
    ([*ESD, "--seed", "x"], "argument --seed: 'x' is not an integer", False),
    ([*ESD, "--seed", "9" * 400], "(400 digits)", False),
    ([*ESD, "--device", "foo"], "unknown device 'foo'", False),
    ([*ESD, "--checkpoint-every", "-1"], "argument --checkpoint-every: must be >= 1", False),
    ([*ESD, "--out", "/proc/x"], "--out /proc/x cannot be created", False),
    ([*ESD, "--out", "{file}/sub"], "is a file, not a folder", False),
    ([*ESD, "--out", ""], "--out is empty", False),
    # a name the file system refuses, or would refuse for the staging folder beside it: found before training
    ([*ESD, "--out", "r" * 240], "is 240 bytes long, and this file system takes at most", False),
    ([*ESD, "--out", "{loop}/run"], "Symlink loop", False),
    ([*ESD, "--save", "changed", "--resume"], "nothing to resume", False),
    ([*ESD, "--frozen-precision", "half"], "--frozen-precision half computes in the mixed precision", False),
    (["erase", "--method", "esd", "--concept", "cat", "--model", "./nope"], "no such path: ./nope", False),
    (["erase", "--concept", "cat"], "--method is needed", False),
    ([*ESD, "--concept", " cat"], "the concept 'cat' is given twice", False),
    (["erase", "--method", "esd", "--concept", "zebra"], "'zebra' is not a digit, colour or style", False),
    (["erase", "--method", "esd", "--model", "{tiny}"], "--concept is needed", False),
    # --show-config prints the options of an erasure that would run, not of one refused
    (["erase", "--method", "esd", "--model", "digits-gan", "--show-config"],
     "esd erases from text-to-image models, but digits-gan is a gan model", False),
    (["erase", "--config", "{partialrun}"], "a run manifest that cannot be rerun (it lacks concepts", False),
    (["erase", "--config", "{stringconcepts}"], "cannot be rerun (its concepts are not a list of names)", False),
    (["erase", "--config", "{textseed}"], "cannot be rerun (its seed is not a whole number)", False),
    (["erase", "--config", "{empty}"], "is a folder; give a YAML file or a run's erasure.json", False),
    # the run's options belong to its method: another method's config would refuse them by name, unexplained
    (["erase", "--method", "fewshot", "--config", "{run}"], "is a run of esd, whose options are esd's: drop --method",
     False),
    ([*ESD, "--config", "{latin1yaml}"], "cannot read it as UTF-8 text", False),
    # an option given empty (`--config "$UNSET"`) is refused, not taken as absent: its default would apply unsaid
    ([*ESD, "--config", ""], "argument --config: is empty", False),
    (["eval", "{run}", "--json", ""], "argument --json: is empty", False),
    (["eval", "{run}", "--baseline", " "], "argument --baseline: is empty", False),
    (["eval", "{run}", "--prompts", ""], "argument --prompts: is empty", False),
    (["eval", "{run}", "--attack", "textual-inversion", "--attack-images", ""], "argument --attack-images: is empty",
     False),
    (["export", "{run}", "--repo-id", "me/x", "--local-dir", ""], "argument --local-dir: is empty", False),
    (["sample", "{tiny}", "--prompt", "a cat", "--out", "/proc/x.png"], "--out /proc/x.png cannot be created", False),
    (["sample", "{tiny}", "--prompt", "a cat", "--out", "o.png", "--steps", "-1"], "argument --steps", False),
    (["sample", "{tiny}", "--prompt", "a cat", "--out", "o.png", "--steps", "0"], "between 1 and 999, not 0", False),
    (["sample", "{tiny}", "--prompt", "a cat", "--out", "o.png", "--steps", "1000"], "and 999, not 1000", False),
    (["sample", "{tiny}", "--prompt", "a cat", "--out", "o.png", "--guidance", "nan"], "argument --guidance", False),
    (["sample", "digits-gan", "--out", "o.png", "--truncation", "nan"], "argument --truncation", False),
    # refused before a single image is drawn: WebP encodes at most 16383 pixels a side
    (["sample", "digits-gan", "--n", "2048", "--out", "o.webp", "--yes"], "would be a", True),
    (["sample", "{tiny}", "--prompt", "a cat", "--n", "200", "--out", "o.webp"],
     "1 row(s) of 200 image(s) at", True),
    # guidance this large overflows the sampler: NaN images would be saved black (or scored as erased) without a word
    (["sample", "{tiny}", "--prompt", "a cat", "--out", "o.png", "--n", "1", "--steps", "2", "--guidance", "1e308"],
     "drew 1 of 1 image(s) with NaN or infinite values", True),
    (["sample", "{tiny}", "--prompt", "a cat", "--out", "o.png", "--n", "0"], "argument --n: must be >= 1", False),
    (["sample", "{tiny}", "--prompt", "a cat", "--out", "s" * 240 + ".png"], "this file system takes at most", False),
    (["sample", "{tiny}", "--prompt", "a cat", "--out", "{root}"], "already holds files; give a new folder", False),
    (["sample", "{tiny}", "--prompt", "a", "--prompt", "b", "--out", "o", "--n", "600"], "pass --yes", False),
    (
        ["sample", "{tiny}", "--prompt", "a cat", "--out", "o.png", "--seed", "4294967295", "--n", "2"],
        "--seed + --n must be between 0 and 4294967295",
        False,
    ),  # fmt: skip
    (["sample", "{randpt}", "--out", "o.png"], "refused to load", True),
    (["sample", "{listindex}", "--out", "o.png"], "model_index.json is not a pipeline index", False),
    (["sample", "digits-gan", "--steps", "3", "--out", "o.png"], "is a GAN: --steps does not apply to it", False),
    # a GAN's weights stay fp32: sample.json and eval.json would record a half precision its images were not drawn in
    (["sample", "digits-gan", "--dtype", "fp16", "--out", "o.png"], "--dtype fp16 does not apply to a GAN", False),
    (["eval", "digits-gan", "--baseline", "digits-gan", "--concept", "seven", "--dtype", "bf16"],
     "--dtype bf16 does not apply to a GAN", False),
    (["sample", "{tiny}", "--prompt", "a", "--truncation", "0.5", "--out", "o.png"], "--truncation does not", False),
    (["sample", "{tiny}", "--prompt", "a", "--model-config", "/x", "--out", "o.png"], "applies to single-file", False),
    (["eval", "{run}", "--attack-steps", "3"], "--attack-steps sets up an attack: add --attack", False),
    (["eval", "{run}", "--resume"], "an interrupted evaluation finished: add --attack", False),
    (["sample", "{tiny}", "--prompt", "a cat", "--out", "{folderpng}"], "is a folder; a grid is one image file", False),
    (["sample", "{tiny}", "--prompt", "a cat", "--out", "grid.gif"], "a grid is written as .png, .jpg", False),
    (["eval", "{run}", "--json", "{run}"], "is a folder; give the report's file name", False),
    (["eval", "{run}", "--json", "e" * 250 + ".json"], "this file system takes at most", False),
    (["eval", "{run}", "--json", "{badcsv}"], "exists and is not an evaluation report", False),
    # the run's own eval.json, damaged: named as itself, not as a --json the user never gave
    (["eval", "{badreportrun}"], "badreportrun/eval.json exists and is not an evaluation report; it is left as it is; "
     "move it away, or pass --json FILE", False),
    ([*ESD, "--out", "{tiny}/erased"], "is inside the model it erases from", False),
    # --out naming the model folder itself: refused as the model, not with "already exists" (as if a run were there)
    (["erase", "--out", "{tiny}", *ESD[1:]], "is inside the model it erases from", False),
    ([*ESD, "--out", "{run}/again"], "is inside the model folder", False),  # the run's digest would change
    ([*ESD, "--set", "lora_rank=100000"], "lora_rank must be between 0 and 1024, not 100000", False),
    (["erase", "--method", "text2unlearn", "--model", "digits-gan", "--concept", "seven", "--save", "lora"],
     "--save lora needs a base saved as a diffusers pipeline folder; digits-gan is a GAN: use --save full", False),
    (["sample", "{badindex}", "--out", "o.png"], "model_index.json is not valid JSON", False),
    (["sample", "{deepindex}", "--out", "o.png"], "model_index.json is not valid JSON (nested too deep)", False),
    (["sample", "{badcard}", "--out", "o.png"], "erasure_model.json is not a model card", False),
    (["sample", "{nvpkl}", "--out", "o.png"], "is not an NVIDIA StyleGAN2 pickle", True),
    (["eval", "{emptyrun}"], "not a complete run manifest", False),
    (["eval", "./nope"], "no such path: ./nope", False),
    (["eval", "{run}", "--fid-features", "bogus"], "unknown --fid-features 'bogus'", False),
    (["eval", "{run}", "--fid-features", "inception:/missing"], "no such Inception weights file /missing", False),
    (["eval", "{run}", "--clip", "no-such-clip"], "unknown CLIP model", False),
    (["eval", "{run}", "--clip", ""], "an empty CLIP name", False),  # Path("") passed for the working folder
    (["erase", "--method", "adapt-unlearn", "--concept", "seven", "--set", "ema_decay=1"],
     "ema_decay must be between 0 and 1 (1 excluded), not 1", False),
    (["erase", "--method", "adapt-unlearn", "--concept", "seven", "--set", "vision_aided="], "an empty CLIP name",
     False),
    (["eval", "{run}", "--samples", "0"], "argument --samples: must be >= 1", False),
    (["eval", "{run}", "--prompts", "missing.csv"], "--prompts missing.csv: no such file", False),
    (["eval", "{run}", "--prompts", "{badcsv}"], "line 3: the seed 'x' is not an integer", False),
    (
        ["eval", "{run}", "--attack", "embedding", "--attack-images", "{file}"],
        "is for --attack textual-inversion",
        False,
    ),
    (["eval", "{run}", "--attack", "textual-inversion", "--attack-images", "{file}"], "is not a folder", False),
    (["eval", "{run}", "--attack", "bogus"], "argument --attack: invalid choice", False),
    (["eval", "{run}", "--attack", "embedding", "--attack-seeds", "0"], "argument --attack-seeds: must be >= 1", False),
    (["eval", "{run}", "--json", "/proc/e.json"], "cannot be created", False),
    (["zoo", "build", "--out", "z", "--scale", "-1"], "argument --scale: must be > 0", False),
    (["zoo", "build", "--out", ""], "--out is empty", False),
    (["zoo", "build", "--out", "z", "--only", "bogus"], "cannot build ['bogus']", False),
    (["zoo", "build", "--out", "z", "--only", "digits-gan"], "digits-gan is built from digits-clip", False),
    (["zoo", "build", "--out", "{file}"], "is a file; --out is the folder", False),
    (["preview", "--port", "70000"], "argument --port", False),
    (["preview", "--host", "no such host!"], "no such host (", False),
    (["preview", "--erased", "{empty}"], "not an erased run folder", False),
    (["preview", "--model", "digits-gan", "--erased", "{run}"],
     "is a text-to-image model; it cannot be compared with a gan base model", False),
    ([*ESD[:-1], "{empty}"], "not a model folder", False),
    ([*ESD[:-1], "{corrupt}"], "corrupt safetensors", True),
    (["sample", "{notextencoder}", "--prompt", "a cat", "--out", "o.png"],
     "notextencoder is missing the text_encoder/ folder that model_index.json lists", True),
    (["erase", "--method", "esd", "--concept", "", "--model", "{tiny}"], "a concept is empty", False),
    ([*ESD, "--set", "lr=fast"], "not a number", False),
    ([*ESD, "--set", "colour=red"], "unknown option", False),
    (["erase", "--method", "sfd", "--concept", "cat", "--model", "{tiny}"], "pass --set override=TEXT", False),
    (["erase", "--method", "fewshot", "--concept", "cat", "--model", "{tiny}"], "pass --images DIR", False),
    (["sample", "{tiny}", "--out", "g.png"], "at least one --prompt", False),
    (["sample", "digits-gan", "--prompt", "a seven", "--out", "x.png"], "takes no --prompt", False),
    # `--model` is not an option of `sample` (the model is positional); it must not become --model-config
    # ... and the one line points at the help of the command that lacks the option, not at `erasure --help`
    (["sample", "--model", "{tiny}", "--prompt", "a cat", "--out", "g.png"],
     "unrecognized arguments: --model (see `erasure sample --help`)", False),
    (["zoo", "list", "--only", "digits-sd"], "unrecognized arguments: --only digits-sd (see `erasure zoo list --help`)",
     False),
    (["eval", "{tiny}", "--concept", "cat"], "--baseline is needed", False),
    (["eval", "digits-gan", "--baseline", "digits", "--concept", "seven"],
     "cannot compare a gan model with a text-to-image model", False),
    (["compare", "{run}"], "has no eval.json: run `erasure eval", False),
    (["compare", "./nope"], "no such run folder or report: ./nope", False),
    (["compare", "{badcsv}"], "not a readable evaluation report", False),
    (["compare", "{partialrun}"], "is not an evaluation report", False),
    (["compare", "{hollowreport}"], "is a damaged evaluation report (it has no before section)", False),
    (["compare", "{run}", "--out", "{foldermd}"], "is a folder; give the table's file name", False),
    (["eval", "digits", "--baseline", "digits", "--concept", "zebra"], "'zebra' is not a digit", False),
    (["compare", "{run}", "--out", "table.txt"], "write a .md (Markdown) or .csv file", False),
    (["compare", "{run}", "--out", "/proc/t.md"], "cannot be created", False),
]
if not torch.cuda.is_available():
    CASES.append((["sample", "{tiny}", "--prompt", "a cat", "--out", "o.png", "--device", "cuda"],
                  "CUDA is not available", False))  # fmt: skip
    CASES.append(([*ESD, "--device", "cuda"], "CUDA", False))


@pytest.fixture(scope="module")
def fixtures(tiny_pipeline_dir, tmp_path_factory):
    """Things to point the bad input at: a file, a run, a run whose manifest is {}, bad checkpoints."""
    root = tmp_path_factory.mktemp("bad-input-fixtures")
    (root / "file").write_text("not a folder")
    run = erase("esd", ["cat"], str(tiny_pipeline_dir), out=root / "run", sets=["steps=1", "ddim_steps=2"],
                progress=False)  # fmt: skip
    empty = root / "emptyrun"  # a finished run whose erasure.json was emptied
    shutil.copytree(run, empty)
    (empty / "erasure.json").write_text("{}")
    damaged = root / "badreportrun"  # a finished run whose eval.json is cut short
    shutil.copytree(run, damaged)
    (damaged / "eval.json").write_text('{"format": "erasure-eval/2"')
    (root / "partial.json").write_text('{"format": "erasure-run/1", "method": "esd"}')
    manifest = json.loads((run / "erasure.json").read_text())  # hand-edited copies of the run's manifest
    (root / "stringconcepts.json").write_text(json.dumps({**manifest, "concepts": "cat"}))  # not c, a and t
    (root / "textseed.json").write_text(json.dumps({**manifest, "seed": "abc"}))
    (root / "latin1.yaml").write_bytes(b"lr: 1e-5  # caf\xe9\n")
    (root / "hollow.json").write_text('{"format": "erasure-eval/2", "concepts": {}}')
    (root / "table.md").mkdir()
    (root / "random.pt").write_bytes(b"\x80\x02\xff" + os.urandom(300))  # a pickle header, then an invalid opcode
    (root / "bad.csv").write_text("prompt,evaluation_seed\na cat,1\na dog,x\n")
    (root / "folder.png").mkdir()
    (root / "empty").mkdir()
    corrupt = root / "corrupt"  # the tiny pipeline, its text encoder's weights cut short
    shutil.copytree(tiny_pipeline_dir, corrupt)
    weights = next((corrupt / "text_encoder").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    shutil.copytree(tiny_pipeline_dir, root / "notextencoder")  # a pipeline folder that lost a component
    shutil.rmtree(root / "notextencoder" / "text_encoder")
    for name, index in (("listindex", b"[]"), ("badindex", b"\xff{"), ("deepindex", b"[" * 100_000)):  # JSON but
        # no object; not even text; nested deeper than the parser goes
        (root / name).mkdir()
        (root / name / "model_index.json").write_bytes(index)
    (root / "badcard").mkdir()  # a pipeline index, and a model card that is no JSON object
    shutil.copyfile(tiny_pipeline_dir / "model_index.json", root / "badcard" / "model_index.json")
    (root / "badcard" / "erasure_model.json").write_text("[]")
    with open(root / "nv.pkl", "wb") as f:  # an NVIDIA-style snapshot whose G_ema is a plain dict, not a network
        pickle.dump({"G_ema": OrderedDict(), "training_set_kwargs": {}}, f)
    (root / "loop").symlink_to(root / "loop")
    return {"tiny": str(tiny_pipeline_dir), "file": str(root / "file"), "run": str(run), "emptyrun": str(empty),
            "badreportrun": str(damaged),
            "loop": str(root / "loop"), "root": str(root),
            "partialrun": str(root / "partial.json"), "badcsv": str(root / "bad.csv"),
            "stringconcepts": str(root / "stringconcepts.json"), "textseed": str(root / "textseed.json"),
            "latin1yaml": str(root / "latin1.yaml"), "hollowreport": str(root / "hollow.json"),
            "foldermd": str(root / "table.md"), "deepindex": str(root / "deepindex"), "badcard": str(root / "badcard"),
            "randpt": str(root / "random.pt"), "nvpkl": str(root / "nv.pkl"), "listindex": str(root / "listindex"),
            "badindex": str(root / "badindex"), "folderpng": str(root / "folder.png"), "empty": str(root / "empty"),
            "corrupt": str(corrupt), "notextencoder": str(root / "notextencoder")}  # fmt: skip


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def in_process(capsys, monkeypatch):
    """`run`, but the command line is called in this process: the same exit status and stderr, in a fraction of the
    time (a process of its own spends 2-3 s importing torch). The loggers it sets up are put back afterwards."""
    import logging

    from pipelines.logs import PROJECT_LOGGERS
    from ui.cli import main

    loggers = [logging.getLogger(name) for name in PROJECT_LOGGERS]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]

    def call(*args, cwd) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = main(["-v", *args])
        except SystemExit as exc:  # argparse's refusals
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    yield call
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers, lg.level, lg.propagate = handlers, level, propagate


def _check_refused(result: subprocess.CompletedProcess, message: str, loads: bool) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr
    if not loads:
        assert lines == errors, result.stderr  # with -v, a model load would have logged a line


@pytest.mark.parametrize("args, message, loads", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_refused_with_one_line(args, message, loads, fixtures, tmp_path, in_process):
    args = [a.format(**fixtures) for a in args]
    watched = [tmp_path, *(p for p in map(os.path.dirname, fixtures.values()))]
    before = {str(folder): _listing(Path(folder)) for folder in watched}
    _check_refused(in_process(*args, cwd=tmp_path), message, loads)
    after = {str(folder): _listing(Path(folder)) for folder in watched}
    assert after == before  # nothing half-written, no empty folders


# One case of each command, as a process of its own: what a shell sees (the table above calls the command line in the
# test's process, which shares its imports and interpreter).
IN_A_PROCESS = [case for case in CASES if (case[0][0], case[1]) in {
    ("erase", "lr must be a finite number, not inf"), ("sample", "refused to load"), ("eval", "no such path: ./nope"),
    ("zoo", "argument --scale: must be > 0"), ("preview", "argument --port")}]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("args, message, loads", IN_A_PROCESS, ids=[" ".join(c[0])[:60] for c in IN_A_PROCESS])
def test_bad_input_is_refused_with_one_line_by_a_process_of_its_own(args, message, loads, fixtures, tmp_path):
    _check_refused(run(*(a.format(**fixtures) for a in args), cwd=tmp_path), message, loads)
    assert list(tmp_path.iterdir()) == []


def test_table_covers_every_command():
    assert {case[0][0] for case in CASES} == {"erase", "sample", "eval", "zoo", "preview", "compare", "export"}


def _erase_command(model, steps: int, checkpoint_every: int) -> list[str]:
    return [sys.executable, "-m", "erasure", "erase", "--method", "esd", "--concept", "cat", "--model", str(model),
            "--out", "run", "--quiet", "--set", f"steps={steps}", "--set", "ddim_steps=3",
            "--checkpoint-every", str(checkpoint_every)]  # fmt: skip


def _wait_for(path: Path, process, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (path.is_file() and path.stat().st_size) and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_process_on_the_same_out_is_refused_at_once_and_the_first_trains_on(tiny_pipeline_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    command = _erase_command(tiny_pipeline_dir, steps=5000, checkpoint_every=100000)
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / ".run.work" / "lock", first)
    for extra in ([], ["--resume"]):
        assert first.poll() is None, "the first run ended before the second could start"
        started = time.time()
        second = subprocess.run(command + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"is being written by process {first.pid}" in second.stderr
        assert time.time() - started < 30  # refused before any model loads (the interpreter's start included)
    # Still training: SIGTERM (a scheduler's stop) has it checkpoint the step it is at and exit as SIGTERM's.
    assert first.poll() is None, "the first run ended before it could be stopped"
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 143 and "SIGTERM: stopped at a checkpoint of step" in err, err
    assert (tmp_path / ".run.work" / "checkpoint" / "checkpoint.pt").is_file() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_killed_run_leaves_a_stale_lock_that_resume_takes_over(tiny_pipeline_dir, tmp_path, in_process):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    command = _erase_command(tiny_pipeline_dir, steps=40, checkpoint_every=2)
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(tmp_path / ".run.work" / "checkpoint" / "checkpoint.pt", first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (tmp_path / ".run.work" / "lock").is_file()  # left behind by the killed process, but no longer held
    arguments = command[3:]  # what follows `python -m erasure`
    again = in_process(*arguments, cwd=tmp_path)
    assert again.returncode == 2 and "pass --resume" in again.stderr, again.stderr
    other = _erase_command(tiny_pipeline_dir, steps=41, checkpoint_every=2)[3:]
    refused = in_process(*other, "--resume", cwd=tmp_path)
    assert refused.returncode == 2 and "made with other values of: config" in refused.stderr, refused.stderr
    resumed = in_process(*arguments, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "run" / "erasure.json").is_file()
    assert '"resumed": true' in (tmp_path / "run" / "erasure.json").read_text()  # its times are of the second part


def test_resuming_a_run_that_stopped_before_its_first_checkpoint_says_it_starts_over(tiny_pipeline_dir, tmp_path,
                                                                                     caplog):  # fmt: skip
    (tmp_path / ".run.work").mkdir()
    (tmp_path / ".run.work" / "lock").write_text("12345\n")  # what a run killed before its first checkpoint leaves,
    (tmp_path / ".run.work" / "fingerprint.json").write_text('{"method": "fewshot"}')  # with the settings it began
    with caplog.at_level("WARNING", logger="erasure"):
        run = erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", resume=True, progress=False,
                    sets=["steps=1", "ddim_steps=2"])  # fmt: skip
    assert any("nothing to resume" in r.getMessage() and "starts from its first step" in r.getMessage()
               for r in caplog.records), caplog.text  # fmt: skip
    assert '"resumed": false' in (run / "erasure.json").read_text()


def test_a_plain_rerun_of_a_run_killed_before_its_first_checkpoint_starts_afresh(tiny_pipeline_dir, tmp_path):
    (tmp_path / ".run.work").mkdir()
    (tmp_path / ".run.work" / "lock").write_text("12345\n")  # nothing to resume: no reason to ask for --resume
    (tmp_path / ".run.work" / "fingerprint.json").write_text('{"method": "fewshot"}')
    run = erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", progress=False,
                sets=["steps=1", "ddim_steps=2"])  # fmt: skip
    assert '"resumed": false' in (run / "erasure.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_preview_on_a_port_another_server_holds_is_refused(tmp_path):
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = run("preview", "--port", str(port), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot serve on 127.0.0.1:{port} (Address already in use): pass another --port"
    )

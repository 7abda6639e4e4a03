"""Run folders: atomic output, manifests, checkpoints and --resume, on a real (tiny) ESD run."""

import json
import os

import pytest
import torch

from erasure.api import erase
from erasure.output import interrupted_message, resumable_run
from pipelines import InputError, load_model

from .conftest import dead_pid, stops_resumably

QUICK = ["steps=4", "ddim_steps=3", "batch_size=1", "lr=1e-2"]


def _stop_at(step_to_fail: int, exc: BaseException):
    def after_step(step, total, logs):
        if step == step_to_fail:
            raise exc

    return after_step


def test_run_folder_is_a_pipeline_with_its_manifest(tiny_pipeline_dir, tmp_path):
    out = erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=QUICK, progress=False)
    manifest = json.loads((out / "erasure.json").read_text())
    assert manifest["method"] == "esd" and manifest["concepts"] == ["cat"]
    assert manifest["config"]["steps"] == 4 and manifest["config"]["scope"] == "xattn"
    assert manifest["base_model"]["sha256"] and manifest["seed"] == 0
    assert manifest["trainable_parameters"] > 0 and manifest["wall_time_s"] > 0 and manifest["peak_rss_mb"] > 0
    assert {"torch", "diffusers", "transformers"} <= set(manifest["versions"])
    assert manifest["changed_components"] == ["unet"]
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(out)  # loadable with no special casing
    assert not (tmp_path / ".run.work").exists()


def test_interrupted_run_resumes_to_the_same_result(tiny_pipeline_dir, tmp_path, monkeypatch):
    straight = erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "a", sets=QUICK, checkpoint_every=2,
                     progress=False)  # fmt: skip
    # A Ctrl-C stays a KeyboardInterrupt for the caller (a sweep's `except Exception` must not swallow it); it
    # says where the checkpoint is
    with pytest.raises(KeyboardInterrupt) as stopped:
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "b", sets=QUICK, checkpoint_every=2,
              progress=False, after_step=_stop_at(3, KeyboardInterrupt()))  # fmt: skip
    assert resumable_run(stopped.value).work == tmp_path / ".b.work"
    assert not (tmp_path / "b").exists()
    assert (tmp_path / ".b.work" / "checkpoint" / "checkpoint.pt").is_file()
    with pytest.raises(InputError, match="pass --resume"):
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "b", sets=QUICK, progress=False)
    with pytest.raises(InputError, match="made with other values of: config"):
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "b", sets=QUICK + ["lr=0.5"], resume=True,
              progress=False)  # fmt: skip
    # and refused before the base model loads (minutes at SDXL size), from the settings the run began with
    import pipelines

    def no_loading(*args, **kwargs):
        raise AssertionError("the base model was loaded before the settings were checked")

    with monkeypatch.context() as patch, pytest.raises(InputError, match="made with other values of: config"):
        patch.setattr(pipelines, "load_model", no_loading)
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "b", sets=QUICK + ["lr=0.5"], resume=True,
              progress=False)  # fmt: skip
    from diffusers import StableDiffusionPipeline

    from tests.conftest import tiny_components

    StableDiffusionPipeline(**tiny_components(seed=1)).save_pretrained(tmp_path / "other-model")
    with pytest.raises(
        InputError, match="made with other values of: base_model_sha256"
    ):  # the same layout, other weights
        erase("esd", ["cat"], str(tmp_path / "other-model"), out=tmp_path / "b", sets=QUICK, resume=True,
              progress=False)  # fmt: skip
    # A checkpoint made on a GPU (other random streams, frozen networks in half precision) does not resume on the CPU
    checkpoint = tmp_path / ".b.work" / "checkpoint" / "checkpoint.pt"
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["fingerprint"]["device"] == "cpu"
    torch.save({**saved, "fingerprint": {**saved["fingerprint"], "device": "cuda"}}, tmp_path / "gpu.pt")
    checkpoint.rename(tmp_path / "cpu.pt")
    (tmp_path / "gpu.pt").rename(checkpoint)
    with pytest.raises(InputError, match="made with other values of: device"):
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "b", sets=QUICK, checkpoint_every=2, resume=True,
              progress=False)  # fmt: skip
    (tmp_path / "cpu.pt").replace(checkpoint)
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[: len(whole) // 2])  # as a full disk leaves it
    with pytest.raises(InputError, match=r"cannot read the checkpoint .*; delete .*\.b\.work to start the run over"):
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "b", sets=QUICK, checkpoint_every=2, resume=True,
              progress=False)  # fmt: skip
    checkpoint.write_bytes(whole)
    resumed = erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "b", sets=QUICK, checkpoint_every=2,
                    resume=True, progress=False)  # fmt: skip
    a, b = load_model(str(straight)).unet.state_dict(), load_model(str(resumed)).unet.state_dict()
    base = load_model(str(tiny_pipeline_dir)).unet.state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it did train
    assert all(torch.equal(a[k], b[k]) for k in a)  # and resuming changed nothing


def test_an_interrupted_run_does_not_resume_under_another_seed_or_other_concepts(tiny_pipeline_dir, tmp_path):
    """The seed draws every timestep and noise of the run, and the concepts are what it erases: a checkpoint
    continued under others would give a result that neither run's settings produce."""
    with stops_resumably():
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=QUICK, checkpoint_every=1,
              progress=False, after_step=_stop_at(1, KeyboardInterrupt()))  # fmt: skip
    with pytest.raises(InputError, match="made with other values of: seed;"):
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=QUICK, seed=1, resume=True,
              progress=False)  # fmt: skip
    with pytest.raises(InputError, match="made with other values of: concepts;"):
        erase("esd", ["dog"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=QUICK, resume=True, progress=False)
    assert not (tmp_path / "run").exists() and (tmp_path / ".run.work" / "checkpoint" / "checkpoint.pt").is_file()


def test_a_run_removes_the_staging_folders_of_killed_runs_only(tiny_pipeline_dir, tmp_path):
    """A process killed while it saved (SIGKILL, the OOM killer) leaves its staging folder, gigabytes at SD size: the
    next run to that --out removes it, whether it resumes or starts afresh, and leaves the folders it does not own."""
    killed = tmp_path / f".run.staging-{dead_pid()}-k1ll3d"
    live = tmp_path / f".run.staging-{os.getpid()}-l1ve"  # another process writing the same --out, still alive
    other = tmp_path / f".run.staging-x.staging-{dead_pid()}-abc"  # a killed run's, but of the run named run.staging-x
    for folder in (killed, live, other):
        (folder / "unet").mkdir(parents=True)
    erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=QUICK, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "run"])


def test_a_file_written_atomically_removes_the_temporary_files_of_killed_writers_only(tmp_path):
    """A writer killed mid-write (SIGKILL during a checkpoint, gigabytes at SD size) leaves its temporary file: the
    next write of that file removes it, and leaves those of live writers and of other files."""
    from pipelines.files import write_json

    killed = tmp_path / f".eval.json.tmp-{dead_pid()}-k1ll3d00"
    live = tmp_path / f".eval.json.tmp-{os.getpid()}-l1ve0000"
    other = tmp_path / f".eval.json.tmp-x.json.tmp-{dead_pid()}-abc"  # a killed writer's, of `eval.json.tmp-x.json`
    # a live writer's, of `eval.json.tmp-PID-x.json`: its name starts as a dead writer's of eval.json would
    lookalike = tmp_path / f".eval.json.tmp-{dead_pid()}-x.json.tmp-{os.getpid()}-abc"
    for file in (killed, live, other, lookalike):
        file.write_text("{")
    write_json(tmp_path / "eval.json", {"ok": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, lookalike.name, "eval.json"])
    assert json.loads((tmp_path / "eval.json").read_text()) == {"ok": True}
    (tmp_path / "plain.json").write_text("")  # what open() makes: the report is as readable as any file
    assert (tmp_path / "eval.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777


def test_failed_run_leaves_nothing_behind(tiny_pipeline_dir, tmp_path, monkeypatch):
    out = tmp_path / "runs" / "sweep" / "run"  # the folders the run made above --out go too, the inner one first
    with pytest.raises(RuntimeError, match="boom"):
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=out, sets=QUICK, checkpoint_every=2,
              progress=False, after_step=_stop_at(1, RuntimeError("boom")))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    # a first checkpoint that could not be written (a full disk) leaves an empty checkpoint folder: nothing to resume
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device") as stopped:
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=out, sets=QUICK, checkpoint_every=2, progress=False)
    assert resumable_run(stopped.value) is None and sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_error_after_a_checkpoint_keeps_its_type_and_says_the_run_can_resume(tiny_pipeline_dir, tmp_path):
    # e.g. CUDA running out of memory at step 3: `except torch.cuda.OutOfMemoryError` must still catch it
    with pytest.raises(MemoryError) as stopped:
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=QUICK, checkpoint_every=2,
              progress=False, after_step=_stop_at(3, MemoryError("out of memory")))  # fmt: skip
    assert type(stopped.value) is MemoryError and resumable_run(stopped.value).work == tmp_path / ".run.work"
    # the command's last line points at the work folder, where the checkpoint is (--out does not exist yet)
    assert interrupted_message(stopped.value) == (
        f"run stopped by MemoryError: out of memory; its last checkpoint is in {tmp_path / '.run.work'} - rerun with "
        "--resume to continue"
    )
    resumed = erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=QUICK, resume=True,
                    progress=False)  # fmt: skip
    assert json.loads((resumed / "erasure.json").read_text())["resumed"]


def test_existing_output_and_missing_resume_are_refused(tiny_pipeline_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match="already exists"):
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "taken", sets=QUICK)
    with pytest.raises(InputError, match="nothing to resume"):
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "new", sets=QUICK, resume=True)
    with pytest.raises(InputError, match="a concept is empty"):
        erase("esd", [" "], str(tiny_pipeline_dir), out=tmp_path / "new", sets=QUICK)


def test_several_concepts_in_one_run(tiny_pipeline_dir, tmp_path):
    out = erase("esd", ["a cat", "a dog"], str(tiny_pipeline_dir), out=tmp_path / "two", sets=QUICK, progress=False)
    manifest = json.loads((out / "erasure.json").read_text())
    assert manifest["concepts"] == ["a cat", "a dog"]
    card = json.loads((out / "erasure_model.json").read_text())
    assert card["erased"]["concepts"] == ["a cat", "a dog"] and card["erased"]["method"] == "esd"
    # a model saved from this run (another erasure of it) carries its own record, not the run's it came from
    load_model(str(out)).save(tmp_path / "again", card={"erased": {"method": "sfd", "concepts": ["a bird"]}})
    again = json.loads((tmp_path / "again" / "erasure_model.json").read_text())
    assert again["erased"] == {"method": "sfd", "concepts": ["a bird"]} and again["family"] == card["family"]


def test_interrupted_advunlearn_run_resumes_to_the_same_text_encoder(tiny_pipeline_dir, tmp_path):
    # The attack state (warm-started embeddings) and the random streams that draw fresh attack
    # tokens must come back from the checkpoint for the result to match an uninterrupted run.
    sets = ["steps=4", "warmup=1", "attack_steps=2", "attack_init=random", "ddim_steps=3", "retain_batch=2",
            "batch_size=2", "lr=1e-2"]  # fmt: skip
    straight = erase("advunlearn", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "a", sets=sets, checkpoint_every=2,
                     progress=False)  # fmt: skip
    with stops_resumably():
        erase("advunlearn", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "b", sets=sets, checkpoint_every=2,
              progress=False, after_step=_stop_at(3, KeyboardInterrupt()))  # fmt: skip
    resumed = erase("advunlearn", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "b", sets=sets, checkpoint_every=2,
                    resume=True, progress=False)  # fmt: skip
    a = load_model(str(straight)).text_encoder.state_dict()
    b = load_model(str(resumed)).text_encoder.state_dict()
    base = load_model(str(tiny_pipeline_dir)).text_encoder.state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_diverging_run_stops_at_the_step_it_diverges_and_leaves_no_run_folder(tiny_pipeline_dir, tmp_path):
    # a finite but absurd negative_guidance overflows the ESD target, hence the loss, at the first step
    # (a NaN one never gets this far: the config refuses it)
    with pytest.raises(InputError, match="training diverged at step 1: loss = (inf|nan)"):
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=QUICK + ["negative_guidance=1e38"],
              progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))
    # nor a checkpoint taken before it diverged: the same settings would diverge again from it, and other settings
    # cannot resume it, so it would only stand in the way of the rerun the message asks for
    with pytest.raises(InputError, match=r"training diverged at step [2-4]:"):
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=QUICK[:-1] + ["lr=1e30"],
              checkpoint_every=1, progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))
    erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=QUICK, checkpoint_every=1, progress=False)

    # weights poisoned after step 2 are caught at step 3, and the checkpoint of step 2 is the good one
    from erasure.config import build_config, parse_sets
    from erasure.esd import erase as esd_erase
    from erasure.training import RunContext, load_checkpoint

    model = load_model(str(tiny_pipeline_dir))

    def poison(step, total, logs):
        if step == 2:
            with torch.no_grad():
                next(p for p in model.unet.parameters() if p.requires_grad).fill_(float("nan"))

    run = RunContext(seed=0, progress=False, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, after_step=poison)
    with pytest.raises(InputError, match="training diverged at step 3: .*weights of the unet are not finite"):
        esd_erase(model, ["cat"], build_config("esd", "sd1", parse_sets(QUICK)), run)
    saved = load_checkpoint(tmp_path / "ckpt")
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["networks"]["unet"].values())


def test_losses_read_every_few_steps_change_nothing_and_still_catch_the_diverging_step(tiny_pipeline_dir):
    # on a GPU the loop reads losses on the host every `sync_every` steps; forced here on the CPU
    from erasure.config import build_config, parse_sets
    from erasure.esd import erase as esd_erase
    from erasure.training import RunContext

    def trained(sync_every, sets=QUICK):
        model = load_model(str(tiny_pipeline_dir))
        result = esd_erase(model, ["cat"], build_config("esd", "sd1", parse_sets(sets)),
                           RunContext(seed=0, progress=False, sync_every=sync_every))  # fmt: skip
        return model.unet.state_dict(), result

    (every_step, a), (every_third, b) = trained(1), trained(3)
    assert all(torch.equal(every_step[k], every_third[k]) for k in every_step)
    assert a.logs == b.logs and set(a.logs) == {"loss"}
    # the overflow happens at step 1; it is read at step 3 and reported at the step it happened
    with pytest.raises(InputError, match="training diverged at step 1: loss = (inf|nan)"):
        trained(3, QUICK + ["negative_guidance=1e38"])


def test_a_concept_longer_than_the_text_encoders_context_is_erased_with_a_warning(tiny_pipeline_dir, tmp_path, caplog):
    concept = " ".join(["cat"] * 100)
    with caplog.at_level("WARNING", logger="erasure"):
        erase("esd", [concept], str(tiny_pipeline_dir), out=tmp_path / "run", sets=["steps=1", "ddim_steps=2"],
              progress=False)  # fmt: skip
    assert any("tokens long; the text encoder reads" in r.getMessage() for r in caplog.records), caplog.text
    # the text encoder reads model_max_length tokens, the start and end tokens among them: a concept that fills them
    # exactly is read whole
    from types import SimpleNamespace

    from transformers import CLIPTokenizer

    from erasure.api import _warn_of_cut_concepts

    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline_dir / "tokenizer")
    fits = " ".join(["cat"] * (tokenizer.model_max_length - 2))
    assert len(tokenizer(fits).input_ids) == tokenizer.model_max_length
    caplog.clear()
    with caplog.at_level("WARNING", logger="erasure"):
        _warn_of_cut_concepts(SimpleNamespace(tokenizer=tokenizer), [fits])
    assert not caplog.records


def test_a_resume_is_tied_to_what_the_files_a_config_names_hold(tmp_path, monkeypatch):
    from PIL import Image

    from erasure.api import run_fingerprint
    from erasure.fewshot import FewShotConfig

    images = tmp_path / "images"
    images.mkdir()
    red, blue = (Image.new("RGB", (8, 8), colour) for colour in ("red", "blue"))
    red.save(images / "a.png")
    config = FewShotConfig(images=str(images))
    base = {"sha256": "0" * 64}

    def fingerprint():
        return run_fingerprint("fewshot", ["cat"], config, 0, "no", base, "cpu")

    first = fingerprint()
    assert first == fingerprint()
    blue.save(images / "a.png")  # same path, other pictures: the checkpoint is not theirs
    assert fingerprint()["input_files"] != first["input_files"]
    red.save(images / "a.png")
    assert fingerprint() == first
    red.save(images / "b.png")
    assert fingerprint()["input_files"] != first["input_files"]
    assert "input_files" not in run_fingerprint("fewshot", ["cat"], FewShotConfig(images="builtin"), 0, "no", base,
                                                "cpu")  # fmt: skip
    # a folder under ~ (as a config file names it) is read too; Adapt-then-Unlearn keeps its folders as given
    from erasure.adapt_unlearn import AdaptUnlearnConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    by_home, by_path = (run_fingerprint("adapt-unlearn", ["seven"], AdaptUnlearnConfig(negatives=folder), 0, "no",
                                        base, "cpu") for folder in ("~/images", str(images)))  # fmt: skip
    assert by_home["input_files"] == by_path["input_files"] == {"negatives": fingerprint()["input_files"]["images"]}
    assert {"concept-erasure-toolkit", "accelerate"} <= first["versions"].keys()


def test_a_resume_is_tied_to_the_kind_of_device_and_the_precisions_and_the_refusal_names_what_differs(tmp_path):
    """A checkpoint made on cuda:0 resumes on cuda:1 (the same random streams and dtypes), not on the CPU; one made with
    an fp32 optimiser state does not resume with an 8-bit one; the refusal names each setting that differs, also one
    that only the command resuming it records."""
    from erasure.api import run_fingerprint
    from erasure.config import build_config
    from erasure.output import refuse_other_settings

    config, base = build_config("esd", "sd1"), {"sha256": "0" * 64}

    def fingerprint(device="cpu", **precision):
        return run_fingerprint("esd", ["cat"], config, 0, "no", base, device, **precision)

    assert fingerprint("cuda:0") == fingerprint("cuda:1") != fingerprint("cpu")
    assert fingerprint(optimizer_state="fp32", frozen_precision="auto") == fingerprint()  # the defaults
    with pytest.raises(InputError, match="made with other values of: frozen_precision, optimizer_state; rerun"):
        refuse_other_settings(fingerprint(), fingerprint(optimizer_state="8bit", frozen_precision="full"), tmp_path)


def test_a_folder_another_writer_made_meanwhile_is_left_as_it_is(tmp_path):
    from pipelines.files import write_folder_atomically

    target = tmp_path / "out"

    def build(staging):
        (staging / "mine").write_text("a")
        target.mkdir()  # another process (a second export to the same --local-dir) finished first
        (target / "theirs").write_text("b")

    with pytest.raises(InputError, match="created by another process while this one wrote it"):
        write_folder_atomically(target, build)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["theirs"]


def test_a_folder_written_atomically_is_readable_by_others_and_leaves_the_mode_of_linked_base_files(tmp_path):
    """safetensors writes 0600 and mkdtemp makes 0700: the result gets ordinary modes. A file hard-linked from a base
    model shares its inode with the base, so its mode is the base's and stays as it is."""
    from pipelines.files import normal_mode, write_folder_atomically

    base = tmp_path / "base.safetensors"
    base.write_bytes(b"weights")
    base.chmod(0o640)

    def build(staging):
        (staging / "unet").mkdir()
        (staging / "unet" / "own.safetensors").write_bytes(b"new")
        (staging / "unet" / "own.safetensors").chmod(0o600)
        os.link(base, staging / "unet" / "lent.safetensors")

    out = write_folder_atomically(tmp_path / "run", build)
    assert (out.stat().st_mode & 0o777, (out / "unet").stat().st_mode & 0o777) == (normal_mode(True),) * 2
    assert (out / "unet" / "own.safetensors").stat().st_mode & 0o777 == normal_mode()
    assert base.stat().st_mode & 0o777 == 0o640
    # those modes are what mkdir and open give under the umask (read as the octal number it is)
    umask = os.umask(0o027)
    try:
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain.txt").write_text("")
        assert (normal_mode(True), normal_mode()) == (0o750, 0o640)
        assert normal_mode(True) == (tmp_path / "plain").stat().st_mode & 0o777
        assert normal_mode() == (tmp_path / "plain.txt").stat().st_mode & 0o777
    finally:
        os.umask(umask)


def test_an_out_name_is_refused_only_when_its_staging_folders_name_would_be_too_long(tmp_path):
    from pipelines.files import NAME_OVERHEAD, check_writable

    longest = os.pathconf(tmp_path, "PC_NAME_MAX") - NAME_OVERHEAD
    assert check_writable(tmp_path / ("r" * longest)) == tmp_path / ("r" * longest)
    with pytest.raises(InputError, match=f"takes at most {longest} for it"):
        check_writable(tmp_path / ("r" * (longest + 1)))
    # the staging folder is the output's, made beside it: in new folders the limit is the last name's
    with pytest.raises(InputError, match=f"takes at most {longest} for it"):
        check_writable(tmp_path / "runs" / ("r" * (longest + 1)))
    assert check_writable(tmp_path / ("r" * (longest + 1)) / "run") == tmp_path / ("r" * (longest + 1)) / "run"
    assert list(tmp_path.iterdir()) == []  # the probe file is removed


@pytest.mark.parametrize("marker", ["model_index.json", "erasure.json", "generator_config.json"])
def test_nothing_is_written_inside_a_model_folder_of_any_kind(marker, tmp_path):
    """A diffusers pipeline, a run, a GAN folder (its generator_config.json): each is identified by the digest of its
    weight files, so a run or an export written inside it would make it another model."""
    from pipelines.files import check_outside_models

    (tmp_path / "model" / "sub").mkdir(parents=True)
    (tmp_path / "model" / marker).write_text("{}")
    check_outside_models(tmp_path / "beside", "--out")
    with pytest.raises(InputError, match="is inside the model folder"):
        check_outside_models(tmp_path / "model" / "sub" / "run", "--out")


def test_a_runs_base_model_is_named_as_resolve_takes_it_and_its_peak_memory_in_mb():
    from pathlib import Path

    from erasure.output import peak_memory_mb, recorded_base_model

    # a Hub base by its id, as an embedded one by its name: the cache path is one machine's, and may be gone
    base = {"spec": "org/model", "path": "/cache/models--org--model/snapshots/0123"}
    assert recorded_base_model({"base_model": {**base, "origin": "hub"}}) == "org/model"
    assert recorded_base_model({"base_model": {**base, "origin": "embedded"}}) == "org/model"
    assert recorded_base_model({"base_model": {**base, "origin": "local"}}) == base["path"]
    # the manifest's peak_rss_mb: the kernel's high-water mark of resident memory (VmHWM, in kB) in MB
    status = Path("/proc/self/status")
    if status.exists():  # Linux
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        hwm_mb = int(line.split()[1]) / 1024
        assert abs(peak_memory_mb("cpu")["peak_rss_mb"] - hwm_mb) <= 0.02 * hwm_mb

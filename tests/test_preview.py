"""The Gradio preview served for real on 127.0.0.1 and driven through `gradio_client`, on the tiny
pipeline and a real (two-step) ESD run of it."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from erasure.api import erase
from erasure.config import build_config
from erasure.evaluation import run_eval
from erasure.registry import METHODS
from pipelines.errors import InputError

QUICK = {"steps": "2", "ddim_steps": "3", "batch_size": "1", "lr": "1e-2"}
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_pipeline_dir, tmp_path_factory):
    """The app on a free local port: base = the tiny pipeline, one finished ESD run under runs/, a folder the
    server is given as a relative path (as its default `runs`), while `erase` returns runs by absolute path."""
    from ui.app import Preview, launch

    runs = tmp_path_factory.mktemp("preview") / "runs"
    run = erase("esd", ["cat"], str(tiny_pipeline_dir), out=runs / "esd-cat", sets=QUICK, progress=False)
    preview = Preview(model=str(tiny_pipeline_dir), runs_dir=Path(os.path.relpath(runs)))
    port = free_port()
    demo = launch(preview, port=port, block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "base": str(tiny_pipeline_dir), "run": str(run), "runs": runs,
           "listed": preview.runs()[0], "preview": preview}  # the run as the page's lists name it  # fmt: skip
    demo.close()


@pytest.fixture
def client(served):
    from gradio_client import Client

    return Client(served["url"], verbose=False)


def generate(client, served, prompts, seed=0, count=2, runs=None, steps="3", strength=1.0, guidance=""):
    return client.predict(served["base"], runs if runs is not None else [served["run"]], prompts, seed, count, steps,
                          guidance, strength, api_name="/generate")  # fmt: skip


def erase_args(served, name, *, steps, every, resume=False):
    """Keyword arguments of the /erase endpoint: an ESD run of the tiny pipeline."""
    options = {"esd_steps": steps, "esd_ddim_steps": 3, "esd_batch_size": 1, "esd_lr": 1e-3}
    return dict(method="esd", concepts="cat", model=served["base"], name=name, every=every, resume=resume,
                compared=[served["run"]], **options)  # fmt: skip


def images(gallery) -> list[tuple[Image.Image, str]]:
    return [(Image.open(item["image"]).convert("RGB"), item["caption"]) for item in gallery["value"]]


def test_importing_ui_and_the_cli_loads_neither_gradio_nor_torch():
    code = "import sys, ui, ui.runs, ui.cli; print(sorted({'gradio', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-m", "erasure", "preview", "--help"], capture_output=True,
                               text=True, cwd=REPO, check=True).stdout  # fmt: skip
    for option in ("--model", "--erased", "--host", "--port", "--share"):
        assert option in help_text
    assert "127.0.0.1" in help_text


def test_generate_endpoint_gives_base_and_erased_images_on_the_same_seeds(client, served):
    from pipelines import load_model

    base, erased, summary = generate(client, served, "a cat\na dog", seed=5, count=2)
    base, erased = images(base), images(erased)
    assert [c for _, c in base] == [f"base · {p} · seed {s}" for p in ("a cat", "a dog") for s in (5, 6)]
    assert [c for _, c in erased] == [f"esd-cat · {p} · seed {s}" for p in ("a cat", "a dog") for s in (5, 6)]
    assert "2 prompt(s) x 2 seed(s)" in summary and "seeds 5-6" in summary  # the seeds drawn, last included
    # The page's base images are the model's own for these seeds, and the erased run draws differently.
    direct = load_model(served["base"]).generate(["a cat", "a dog"], [5, 6], steps=3)
    assert [im.tobytes() for im, _ in base] == [im.tobytes() for row in direct for im in row]
    assert all(a.tobytes() != b.tobytes() for (a, _), (b, _) in zip(base, erased))


def test_a_lora_erasure_is_switched_off_and_weakened_from_the_page(client, served, tmp_path):
    """The strength slider: 0 draws the base model's images, 1 the run's own, between them something else; a
    full-weight run beside it is drawn as trained."""
    from pipelines import load_model

    lora = erase("esd", ["cat"], served["base"], out=tmp_path / "esd-lora", progress=False,
                 sets={**QUICK, "lora_rank": "4"})  # fmt: skip
    runs = [str(lora), served["run"]]

    def drawn(strength):
        base, erased, summary = generate(client, served, "a cat", count=1, runs=runs, strength=strength)
        return images(base)[0][0].tobytes(), [im.tobytes() for im, _ in images(erased)], images(erased), summary

    base, (off, full_run), captioned, summary = drawn(0.0)
    assert off == base and captioned[0][1] == "esd-lora @ 0 · a cat · seed 0"
    assert "LoRA strength 0 on 1 LoRA run(s), 1 full-weight run(s) as trained" in summary
    _, (on, full_again), _, _ = drawn(1.0)
    assert on == load_model(str(lora)).generate(["a cat"], [0], steps=3)[0][0].tobytes() != base
    _, (half, _), _, _ = drawn(0.5)
    assert half not in (base, on) and full_run == full_again  # the full-weight run takes no strength


def test_the_page_draws_up_to_its_image_limit_and_refuses_more():
    from ui.compare import MAX_IMAGES, ModelCache, compare

    cache = ModelCache()
    result = compare(cache, "digits-gan", [], [], list(range(MAX_IMAGES)))  # a GAN: one image per seed
    assert len(result.base) == MAX_IMAGES and result.base[-1][1] == f"base · seed {MAX_IMAGES - 1}"
    with pytest.raises(InputError, match=f"at most {MAX_IMAGES} images per model"):
        compare(cache, "digits-gan", [], [], list(range(MAX_IMAGES + 1)))


def test_the_model_cache_lets_the_model_used_longest_ago_go(tiny_gan_checkpoint, tmp_path):
    from ui.compare import ModelCache

    paths = [str(shutil.copy(tiny_gan_checkpoint, tmp_path / f"{name}.pt")) for name in "abc"]
    cache = ModelCache(size=2)
    a, b = cache.get(paths[0]), cache.get(paths[1])
    assert cache.get(paths[0]) is a  # used again: b is now the one used longest ago
    cache.get(paths[2])
    assert cache.get(paths[0]) is a and cache.get(paths[1]) is not b


def test_runs_are_listed_newest_first_without_work_folders_or_unfinished_runs(tmp_path, monkeypatch):
    from ui.runs import find_runs

    for age, name in enumerate(["new", "old", ".new.work", "older"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "erasure.json").write_text("{}")
        os.utime(tmp_path / name, (2_000_000_000 - age, 2_000_000_000 - age))
    (tmp_path / "unfinished").mkdir()  # no manifest yet
    assert find_runs(tmp_path) == [tmp_path / "new", tmp_path / "old", tmp_path / "older"]
    # a run named on the command line comes first, and once, however the runs folder spells it
    from ui.app import Preview

    monkeypatch.chdir(tmp_path)
    assert Preview(erased=[str(tmp_path / "old")], runs_dir=Path(".")).runs() == [str(tmp_path / "old"), "new", "older"]


def test_a_one_step_lora_run_takes_no_strength(client, served, tmp_path):
    """SFD's adapters are its one-step generator's: on the multi-step base they would draw neither the base nor the
    run, so a strength other than 1 is refused rather than drawn and mislabelled."""
    from gradio_client.exceptions import AppError

    sfd = erase("sfd", ["cat"], served["base"], out=tmp_path / "sfd-lora", progress=False, save="lora",
                sets=["steps=1", "batch_size=1", "forget_batch=1", "remain_prompts=2", "override=a dog",
                      "prompt_templates={}", "lora_rank=2"])  # fmt: skip
    with pytest.raises(AppError, match="one-step generator .*drawn as trained only"):
        generate(client, served, "a cat", count=1, runs=[str(sfd)], strength=0.5)


def test_ten_concurrent_generate_requests_are_all_answered(client, served):
    jobs = [client.submit(served["base"], [served["run"]], "a cat", seed, 1, "2", "", 1.0, api_name="/generate")
            for seed in range(10)]  # fmt: skip
    results = [job.result(timeout=120) for job in jobs]
    for seed, (base, erased, _) in enumerate(results):  # each answer is its own request's, none lost
        assert [c for _, c in images(base)] == [f"base · a cat · seed {seed}"]
        assert [c for _, c in images(erased)] == [f"esd-cat · a cat · seed {seed}"]


def test_errors_are_messages_in_the_page_and_the_server_keeps_serving(client, served, tmp_path):
    from gradio_client.exceptions import AppError

    (tmp_path / "not-a-run").mkdir()
    cases = [
        (dict(runs=[str(tmp_path / "not-a-run")], prompts="a cat"), "not an erased run folder"),
        (dict(runs=[str(tmp_path / "missing")], prompts="a cat"), "is not a folder"),
        (dict(runs=[], prompts="  \n "), "type at least one prompt"),
        (dict(prompts="a cat", steps="many"), "steps must be a whole number"),
        # the limits `erasure sample` puts on the same settings
        (dict(prompts="a cat", steps="0"), "steps must be between 1 and 999, not 0"),
        (dict(prompts="a cat", steps="-3"), "steps must be between 1 and 999, not -3"),
        (dict(prompts="a cat", steps="1000"), "steps must be between 1 and 999, not 1000"),
        (dict(prompts="a cat", guidance="nan"), "guidance must be a finite number"),
        (dict(prompts="a cat", guidance="-50"), "guidance must be >= 0, not -50"),
        (dict(prompts="a cat", seed=-5), "first seed must be between 0 and 4294967295, not -5"),
        (dict(prompts="a cat", seed=10**12), "first seed must be between 0 and 4294967295"),
        (dict(prompts="a cat", seed=2**64), "first seed must be between 0 and 4294967295"),
        (dict(prompts="a cat", seed=2**32 - 1, count=2), r"last seed \(first seed \+ seeds - 1\) must be between"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AppError, match=message):
            generate(client, served, **kwargs)
    with pytest.raises(AppError, match="concept"):
        client.predict(**{**erase_args(served, "x", steps=2, every=1), "concepts": " , "}, api_name="/erase")
    for hidden in ("../escape", ".esd-x.work"):  # a hidden name is never listed, and is a run's work folder's
        with pytest.raises(AppError, match="not a path"):
            client.predict(**erase_args(served, hidden, steps=2, every=1), api_name="/erase")
    with pytest.raises(AppError, match="lr must be > 0"):  # a run that fails: its config is refused
        client.predict(**{**erase_args(served, "x", steps=2, every=1), "esd_lr": -1}, api_name="/erase")
    with pytest.raises(AppError, match="already exists"):
        client.predict(**erase_args(served, "esd-cat", steps=2, every=1), api_name="/erase")
    base, erased, _ = generate(client, served, "a cat", count=1)
    assert len(images(base)) == len(images(erased)) == 1


def test_run_prompts_are_the_evaluation_prompts_of_its_concept(client, served, tmp_path):
    prompts = client.predict([served["run"]], api_name="/run_prompts").splitlines()
    assert prompts[:2] == ["cat", "a photo of cat"] and len(prompts) == 4
    # a digits run's are the digits family's: its words for a digit, and other digits that must survive
    from ui.runs import default_prompts

    digits = {"method": "esd", "concepts": ["seven"], "config": {}, "seed": 0,
              "base_model": {"spec": "digits", "origin": "embedded", "path": "digits", "family": "digits"}}  # fmt: skip
    (tmp_path / "erasure.json").write_text(json.dumps(digits))
    assert default_prompts(tmp_path) == ["a seven", "the number seven", "a white plain zero", "a red italic zero"]


def test_erase_from_the_page_can_be_cancelled_and_resumed(client, served):
    out, work = served["runs"] / "esd-cancel", served["runs"] / ".esd-cancel.work"
    # 100 steps: the cancel arrives within the first few (at step 4 here), long before the last
    job = client.submit(**erase_args(served, "esd-cancel", steps=100, every=2), api_name="/erase")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for the first progress report
        if any("<progress" in output[0] for output in job.outputs()):
            break
        time.sleep(0.1)
    assert job.outputs()[0][0].startswith("Starting esd on cat")
    assert "esd on cat: step" in job.outputs()[-1][0]
    assert client.predict(api_name="/cancel").startswith("Cancelling")
    final = job.result(timeout=120)[0]
    assert "Cancelled" in final and "resume" in final
    assert not out.exists() and (work / "checkpoint" / "checkpoint.pt").is_file()
    assert client.predict(api_name="/cancel") == "No erasure of yours is running."

    # Resuming from the page finishes the run, which then joins the comparison.
    final, _, compared, metrics_run, export_run = client.predict(
        **erase_args(served, "esd-cancel", steps=100, every=2, resume=True), api_name="/erase"
    )
    assert "Finished" in final and out.joinpath("erasure.json").is_file() and not work.exists()
    listed = compared["value"][-1]  # the run as the lists spell it, a value each of them accepts
    assert compared["value"] == [served["run"], listed] and Path(listed).resolve() == out.resolve()
    assert metrics_run["value"] == export_run["value"] == listed
    for dropdown in (compared, metrics_run, export_run):
        assert listed in [value for _, value in dropdown["choices"]]
    assert "no eval.json yet" in client.predict(metrics_run["value"], api_name="/metrics")[2]


def test_cancel_keeps_a_run_its_stopping_rule_has_just_finished(tiny_pipeline_dir, concept_images, tmp_path):
    """Few-shot's rule ends the run at a step where the loop writes no checkpoint; a cancel pending then must not
    turn the finished run into a cancelled one."""
    from ui.jobs import EraseJob

    # 4 images at batch 2: an epoch is 2 steps, the rule checks after it and stops (digits-clip sees no red seven).
    sets = {"images": str(concept_images), "steps": 4, "batch_size": 2, "lr": 1e-2, "stop_clip": "digits-clip",
            "stop_samples": 2, "stop_steps": 2, "stop_below": 1.0}  # fmt: skip
    job = EraseJob("fewshot", ["a red seven"], str(tiny_pipeline_dir), tmp_path / "run", sets, checkpoint_every=2)
    job.cancel.set()  # pressed before the step the run stops at, which is also a checkpoint step
    job.start()
    reports = []
    while job.running or not job.updates.empty():
        reports += [update] if (update := job.wait(0.1)) else []
    assert job.error is None and job.result == tmp_path / "run" and (tmp_path / "run" / "erasure.json").is_file()
    assert [(r.step, r.total) for r in reports] == [(1, 4), (2, 2)]  # the stop is the run's last step


def test_a_multi_stage_run_shows_each_stage_and_plots_its_losses_apart(tiny_pipeline_dir, tmp_path):
    """STEREO trains in five loops (erase, invert, erase, invert, erase once), each counting from step 1."""
    from ui.events import _plot, _plot_rows, _progress_html
    from ui.jobs import EraseJob

    sets = dict(rounds=2, search_steps=2, inversion_steps=2, inversion_images=4, inversion_batch=2, ddim_steps=3,
                batch_size=2, steps=2, prompt_templates="{},a {}")  # fmt: skip
    job = EraseJob("stereo", ["cat"], str(tiny_pipeline_dir), tmp_path / "run", sets).start()
    reports, history = [], []
    while job.running or not job.updates.empty():
        if update := job.wait(0.1):
            reports.append(update)
            history += _plot_rows(update)
    assert job.error is None
    assert [(r.stage, r.step, r.total) for r in reports] == [(s, i, 2) for s in range(1, 6) for i in (1, 2)]
    assert "stereo on cat: stage 5: step 2/2" in _progress_html(job, reports[-1])
    assert "stage" not in _progress_html(job, reports[0])
    # one series per stage, each in the legend, which makes the chart draw the series that appear after its first
    assert _plot(history[:2]).colors_in_legend == ["erase"]
    assert _plot(history).colors_in_legend == [f"stage {s} · {'denoising' if s % 2 == 0 else 'erase'}"
                                               for s in range(1, 6)]  # fmt: skip


def test_the_form_reads_its_concepts_and_blank_fields_and_says_where_a_cancel_stops():
    from ui.jobs import next_checkpoint, parse_concepts
    from ui.options import from_field, method_options

    assert parse_concepts("seven, red\n italic \n\n,") == ["seven", "red", "italic"]
    # the loop checkpoints every `every` steps but not at its last step, where the run finishes instead
    assert (next_checkpoint(3, 10, 25), next_checkpoint(10, 10, 25)) == (10, 20)
    assert next_checkpoint(12, 10, 20) is None and next_checkpoint(21, 10, 25) is None
    # and the page says so while a cancel is pending (a thread that waits stands in for the training's)
    from ui.events import _progress_html
    from ui.jobs import EraseJob, Step

    job = EraseJob("esd", ["cat"], None, Path("run"), {}, checkpoint_every=10)
    job.cancel.set()
    training = threading.Event()
    job._thread = threading.Thread(target=training.wait)
    job._thread.start()
    try:
        shown = _progress_html(job, Step(13, 25, {}))
        assert "<progress value='13' max='25'" in shown and "stops after the checkpoint at step 20" in shown
        assert "finishing" in _progress_html(job, Step(21, 25, {}))
    finally:
        training.set()
    alpha = next(o for o in method_options("esd") if o.name == "lora_alpha")
    assert from_field(alpha, "  ") is None  # a blank optional field is the default, not a bad number
    assert build_config("esd", "sd1", {"lora_alpha": from_field(alpha, " ")}).lora_alpha is None


@pytest.mark.parametrize("method", list(METHODS))
def test_erase_options_are_the_config_fields_with_their_presets(method):
    from ui.options import PAPER, from_field, method_options, preset_names, to_field

    options = method_options(method)
    assert [o.name for o in options] == [f.name for f in dataclasses.fields(METHODS[method].config)]
    assert all(o.help for o in options)
    for preset in preset_names(options):
        family, lora, _ = ("sd1" if preset == PAPER else preset).partition(" + LoRA")
        # What the form shows for a preset, sent back, builds that preset's config exactly; a LoRA preset's is
        # the family's preset at the rank it was measured at.
        sent = {o.name: from_field(o, to_field(o, preset)) for o in options}
        rank = {"lora_rank": sent["lora_rank"]} if lora else {}
        assert build_config(method, "sd1", sent) == build_config(method, family, rank)


def test_the_base_model_is_the_selected_runs_own_unless_one_is_given(served, tmp_path):
    """A GAN run selected beside the default text-to-image digits could not be compared at all."""
    import gradio as gr

    from ui.app import Preview, build_app
    from ui.runs import default_prompts

    def shown(preview, label="base model"):
        demo = build_app(preview)
        return next(b.value for b in demo.blocks.values() if isinstance(b, gr.Textbox) and b.label == label)

    assert Path(shown(Preview(erased=[served["run"]], runs_dir=served["runs"]))) == Path(served["base"])
    # a text-to-image run opens with its evaluation's prompts to draw
    prompts = shown(Preview(erased=[served["run"]], runs_dir=served["runs"]), "prompts (one per line)")
    assert prompts.splitlines() == default_prompts(served["run"]) and prompts
    assert shown(Preview(model="digits", erased=[served["run"]], runs_dir=served["runs"])) == "digits"
    # with none named, it opens on the newest run of the runs folder
    runs = tmp_path / "runs"
    for age, name in enumerate(["newer", "older"]):
        shutil.copytree(served["run"], runs / name)
        os.utime(runs / name, (2_000_000_000 - age, 2_000_000_000 - age))
    demo = build_app(Preview(model="digits", runs_dir=runs))
    [opened] = [b.value for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "erased runs"]
    assert opened == [str(runs / "newer")]


def test_a_shared_page_exports_nothing_and_loads_only_its_own_models(client, served, tmp_path, monkeypatch):
    from gradio_client.exceptions import AppError

    monkeypatch.setattr(served["preview"], "shared", True)  # as `--share` sets it; the link itself needs the network
    for folder in ("", str(tmp_path / "anywhere")):  # neither the Hub with this machine's token nor any folder
        with pytest.raises(AppError, match=r"Export is off on a shared page \(`--share`\)"):
            client.predict(served["listed"], "me/tiny-no-cat", folder, api_name="/export")
    assert not (tmp_path / "anywhere").exists()
    # a visitor's own path or Hub id is not loaded, as a base or as a run; the owner's models are
    with pytest.raises(AppError, match="a shared page .* loads only the embedded models"):
        generate(client, served, "a cat", runs=[str(tmp_path)])
    preview = served["preview"]
    for base, runs in ((str(tmp_path / "elsewhere"), []), ("someone/some-model", []), (None, [str(tmp_path)])):
        with pytest.raises(InputError, match="a shared page .* loads only the embedded models"):
            for model in (base, *runs):
                preview.check_loadable(model)
    for model in ("digits", served["listed"], None):
        preview.check_loadable(model)


def test_an_export_past_its_time_is_asked_to_stop_before_it_is_killed(tmp_path):
    """SIGTERM first, so that `erasure export` can remove its staging folder; SIGKILL would leave it behind."""
    from ui.export import run_child

    stopped = tmp_path / "stopped"
    child = "\n".join([
        "import pathlib, signal, sys, time",
        f"stopped = pathlib.Path({str(stopped)!r})",
        "signal.signal(signal.SIGTERM, lambda *_: (stopped.write_text('term'), sys.exit(1)))",
        "time.sleep(60)",
    ])  # fmt: skip
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_child([sys.executable, "-c", child], timeout_s=2)
    assert stopped.read_text() == "term" and time.monotonic() - start < 10


def test_a_failed_export_shows_its_error_not_what_it_printed_before(tmp_path, monkeypatch):
    # a library's warning on stderr comes before the command's own `error: ...` line, which the page must show
    import ui.export

    run = tmp_path / "run"
    run.mkdir()
    manifest = {"method": "esd", "concepts": ["cat"], "config": {}, "seed": 0,
                "base_model": {"spec": "digits", "origin": "embedded", "path": "digits"}}  # fmt: skip
    (run / "erasure.json").write_text(json.dumps(manifest))
    (run / "eval.json").write_text("{}")
    child = "import sys; sys.stderr.write('SomeWarning: from a library\\nerror: the real reason\\n'); sys.exit(2)"
    monkeypatch.setattr(ui.export, "export_command", lambda *args: [sys.executable, "-c", child])
    with pytest.raises(InputError, match="^the real reason$"):
        ui.export.export_run(str(run), "me/x", str(tmp_path / "out"))


def test_export_button_runs_erasure_export_and_shows_its_outcome(client, served, tmp_path, monkeypatch):
    from gradio_client.exceptions import AppError

    monkeypatch.delenv("HF_TOKEN", raising=False)  # the server runs in this process
    run = served["listed"]
    with pytest.raises(AppError, match="repository id"):
        client.predict(run, " ", str(tmp_path / "out"), api_name="/export")
    with pytest.raises(AppError, match="no Hugging Face token"):
        client.predict(run, "me/tiny-no-cat", "", api_name="/export")
    with pytest.raises(AppError, match="no eval.json yet: press Evaluate first"):  # --no-eval is not on the page
        client.predict(run, "me/tiny-no-cat", str(tmp_path / "out"), api_name="/export")
    assert not (tmp_path / "out").exists()
    # Evaluated (other tests do not mind its eval.json), the run is exported by `erasure export`: the page shows
    # what that command prints.
    run_eval(run, samples=1, clip="digits-clip", progress=False)
    page_dir, cli_dir = tmp_path / "page", tmp_path / "cli"
    shown = client.predict(run, "me/tiny-no-cat", str(page_dir), api_name="/export")
    command = [sys.executable, "-m", "erasure", "export", run, "--repo-id", "me/tiny-no-cat"]
    cli = subprocess.run(command + ["--local-dir", str(cli_dir)], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    # its notes too (here: the tiny base is a folder, not a Hub id), which the command prints on stderr
    notes = [line for line in cli.stderr.splitlines() if line.startswith("note: ")]
    assert notes and shown == "\n".join([cli.stdout.strip(), *notes]).replace(str(cli_dir), str(page_dir))
    assert (page_dir / "README.md").is_file() and sorted(p.name for p in page_dir.iterdir()) == sorted(
        p.name for p in cli_dir.iterdir()
    )

    # The Metrics tab shows the evaluation's grids wherever the run is: gradio serves files only from its working and
    # temporary folders, so here the run is outside both.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))  # the server runs in this process
    rows, grids, _ = client.predict(run, api_name="/metrics")
    written = json.loads((Path(run) / "eval.json").read_text())["grids"].values()
    assert rows["data"] and len(grids) == len(written) > 0
    for grid, rel in zip(grids, written):  # the grids' own pixels
        assert Image.open(grid["image"]).tobytes() == Image.open(Path(run) / rel).tobytes()

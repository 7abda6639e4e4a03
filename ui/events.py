"""What the page's buttons do: one `wire_*` function per tab attaches its handlers to the components.

Every handler turns a failure into a message in the page (`reported`): `InputError` reads as it
is, anything else as its type and text with the traceback in the server's log; the server itself
keeps serving. Handlers that touch a model (Generate, Erase, Evaluate, Export) share one Gradio
concurrency limit, so they queue behind one another instead of competing for the CPU, the GPU's
memory or a pipeline that is not thread-safe: one model at a time on the machine.
"""

import functools
import html
import inspect
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from erasure.api import default_out_dir
from erasure.output import resumable_run
from pipelines.errors import InputError

from .compare import compare, parse_prompts
from .export import SHARED_PAGE_EXPORT, export_run
from .jobs import EraseJob, Step, next_checkpoint, parse_concepts, summarise_logs
from .metrics import eval_table, evaluate_run
from .options import from_field, to_field
from .runs import default_prompts, run_choices

log = logging.getLogger("erasure.preview")

GALLERY_ROW_PX = 150
UPDATE_EVERY_S = 0.3  # how often a running erasure refreshes the page
MODEL_QUEUE = "models"  # the one concurrency id, at limit 1, of every handler that loads or trains a model


def reported(fn):
    """Failures become a message in the page (gr.Error); unexpected ones also go to the log."""

    def page_error(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, InputError):
            return gr.Error(str(exc), print_exception=False)
        log.exception("preview: %s failed", fn.__name__)
        return gr.Error(f"{type(exc).__name__}: {exc}", print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise page_error(exc) from exc

        return generator

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise page_error(exc) from exc

    return call


def wire_compare(preview, page: SimpleNamespace, demo: gr.Blocks) -> None:
    @reported
    def generate(base, runs, prompts, seed, count, steps, guidance, strength):
        first = int(seed or 0)
        seeds = list(range(first, first + int(count)))
        steps, guidance = _optional(steps, int, "steps"), _optional(guidance, float, "guidance")
        for model in (base, *(runs or [])):
            preview.check_loadable(model)
        result = compare(preview.cache, base, runs or [], parse_prompts(prompts), seeds, steps=steps, guidance=guidance,
                         lora_strength=float(strength))  # fmt: skip
        columns = len(seeds)
        # The erased side has the most rows (one per run and prompt); both galleries get its height.
        rows = max(1, -(-len(result.erased) // columns))
        height = min(GALLERY_ROW_PX * rows + 60, 900)
        return (gr.Gallery(value=result.base, columns=columns, height=height),
                gr.Gallery(value=result.erased, columns=columns, height=height), result.summary)  # fmt: skip

    page.generate.click(
        generate,
        [page.base, page.compare_runs, page.prompts, page.seed, page.count, page.steps, page.guidance,
         page.lora_strength],
        [page.base_images, page.erased_images, page.compare_status], api_name="generate",
        concurrency_limit=1, concurrency_id=MODEL_QUEUE,
    )  # fmt: skip

    @reported
    def runs_prompts(runs):
        if not runs:
            raise InputError("choose an erased run first")
        return "\n".join(dict.fromkeys(p for run in runs for p in default_prompts(run)))

    page.take_prompts.click(runs_prompts, page.compare_runs, page.prompts, api_name="run_prompts")

    @reported
    def refresh_runs():
        return [gr.Dropdown(choices=run_choices(preview.runs()))] * len(page.run_lists)

    page.refresh.click(refresh_runs, None, page.run_lists, api_name="refresh_runs")
    demo.load(refresh_runs, None, page.run_lists, api_visibility="private")  # runs made since the server started


def _erase_job(preview, session: str, method, concepts, model, name, every, resume, sets: dict) -> EraseJob:
    """The job the form asks for (not started), or one line saying why the form does not make one."""
    concepts = parse_concepts(concepts)
    if not concepts:
        raise InputError("type the concept(s) to erase, separated by commas")
    name = (name or "").strip() or default_out_dir(method, concepts).name
    if Path(name).name != name or name.startswith("."):
        raise InputError(f"a run name is a folder name under {preview.runs_dir}/, not a path: {name!r}")
    preview.check_loadable(model)
    running = preview.jobs.get(session)
    if running is not None and running.running:
        raise InputError("an erasure you started is still running: cancel it or wait for it")
    return EraseJob(method, concepts, (model or "").strip() or None, preview.runs_dir / name, sets,
                    resume=bool(resume), checkpoint_every=int(every or 0), device=preview.device)  # fmt: skip


def wire_erase(preview, page: SimpleNamespace) -> None:
    options, run_lists = page.options, page.run_lists
    unchanged = [gr.skip()] * len(run_lists)

    def show_method(key):
        return [gr.Accordion(visible=k == key) for k in page.option_groups]

    page.method.change(show_method, page.method, list(page.option_groups.values()), api_visibility="private")

    def apply_preset(name):
        return [to_field(option, name) for option in options]

    page.preset.change(apply_preset, page.preset, page.option_fields, api_visibility="private")

    @reported
    def start_erase(request: gr.Request, method, concepts, model, name, every, resume, compared, *values):
        sets = {o.name: from_field(o, v) for o, v in zip(options, values) if o.method == method}
        job = _erase_job(preview, request.session_hash, method, concepts, model, name, every, resume, sets)
        preview.jobs[request.session_hash] = job.start()
        history, last, shown = [], None, 0.0
        starting = f"Starting {html.escape(method)} on {html.escape(', '.join(job.concepts))}: loading the model..."
        yield starting, gr.skip(), *unchanged  # the plot appears with the first step's losses
        try:
            while job.running or not job.updates.empty():
                update = job.wait(UPDATE_EVERY_S)
                if update is not None:
                    last = update
                    history += _plot_rows(update)
                if last is not None and (time.monotonic() - shown >= UPDATE_EVERY_S or not job.running):
                    shown = time.monotonic()
                    yield _progress_html(job, last), _plot(history), *unchanged
        finally:
            if job.running:  # the page went away or the event was dropped: stop at the next checkpoint
                job.cancel.set()
            if preview.jobs.get(request.session_hash) is job:
                del preview.jobs[request.session_hash]
        kept = resumable_run(job.error)
        if kept is not None:
            yield (f"<b>Cancelled</b> at step {last.step if last else '?'}: the checkpoint is kept in "
                   f"<code>{html.escape(str(kept.work))}</code>. Tick <i>resume</i> and press Erase to "
                   f"continue (or <code>erasure erase ... --out {html.escape(str(job.out))} --resume</code>).",
                   gr.skip(), *unchanged)  # fmt: skip
            return
        if job.error is not None:  # the message goes to the page; the status must not say "running"
            yield f"<b>Failed</b>: {html.escape(str(job.error))}", gr.skip(), *unchanged
            raise job.error
        runs = preview.runs()
        out = _as_listed(job.result, runs)
        choices = run_choices(runs)
        joined = list(dict.fromkeys([*(compared or []), out]))
        done = f"<b>Finished</b>: <code>{html.escape(out)}</code> joins the comparison."
        yield (done, _plot(history), gr.Dropdown(choices=choices, value=joined),
               gr.Dropdown(choices=choices, value=out), gr.Dropdown(choices=choices, value=out))  # fmt: skip

    start_erase.__signature__ = _name_options(start_erase, options)
    inputs = [page.method, page.concepts, page.erase_model, page.run_name, page.checkpoint_every, page.resume,
              page.compare_runs, *page.option_fields]  # fmt: skip
    page.erase.click(
        start_erase, inputs, [page.erase_status, page.losses, *run_lists], api_name="erase", concurrency_limit=1,
        concurrency_id=MODEL_QUEUE, show_progress="minimal", show_progress_on=[page.erase_status],
    )  # fmt: skip

    @reported
    def cancel(request: gr.Request):
        job = preview.jobs.get(request.session_hash)
        if job is None or not job.running:
            return "No erasure of yours is running."
        job.cancel.set()
        return "Cancelling: the run stops at its next checkpoint and can then be resumed."

    # Never queued behind anything: a cancel must reach the running job at once.
    page.cancel.click(cancel, None, page.cancel_status, api_name="cancel", concurrency_limit=None)


def wire_metrics(preview, page: SimpleNamespace, demo: gr.Blocks) -> None:
    outputs = [page.table, page.grids, page.metrics_message]

    @reported
    def show_metrics(run):
        if not run:
            return [], [], "Choose a run."
        return _with_images(eval_table(run))

    page.metrics_run.change(show_metrics, page.metrics_run, outputs, api_name="metrics")
    demo.load(show_metrics, page.metrics_run, outputs, api_visibility="private")

    @reported
    def evaluate(run, samples, progress=gr.Progress(track_tqdm=True)):
        if not run:
            raise InputError("choose a run to evaluate")
        progress(0, desc="loading the models")
        evaluate_run(run, _optional(samples, int, "seeds per prompt"), device=preview.device)
        return _with_images(eval_table(run))

    page.evaluate.click(evaluate, [page.metrics_run, page.samples], outputs, api_name="evaluate",
                        concurrency_limit=1, concurrency_id=MODEL_QUEUE)  # fmt: skip


def wire_export(preview, page: SimpleNamespace) -> None:
    @reported
    def export(run, repo, folder):
        if preview.shared:  # checked here, not only on the page: the API reaches this handler without it
            raise InputError(SHARED_PAGE_EXPORT)
        return export_run(run, repo, folder)

    page.export.click(export, [page.export_run, page.repo_id, page.local_dir], page.export_status, api_name="export",
                      concurrency_limit=1, concurrency_id=MODEL_QUEUE)  # fmt: skip


def _name_options(fn, options) -> inspect.Signature:
    """`fn`'s signature with its `*values` spelled out as `<method>_<field>`, so the API page names each option."""
    signature = inspect.signature(fn)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    named = [inspect.Parameter(f"{o.method}_{o.name}".replace("-", "_"), inspect.Parameter.POSITIONAL_OR_KEYWORD)
             for o in options]  # fmt: skip
    return signature.replace(parameters=fixed + named)


def _optional(text, kind: type, name: str):
    """An optional number typed in a text box: empty means the model's default."""
    text = str(text if text is not None else "").strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise InputError(f"{name} must be {'a whole number' if kind is int else 'a number'}, not {text!r}") from None


def _as_listed(run: Path, runs: list[str]) -> str:
    """`run` spelled as the run lists spell it (folders under the runs folder as given; `erase` returns it
    resolved): a dropdown accepts only a value among its choices."""
    resolved = Path(run).resolve()
    return next((listed for listed in runs if Path(listed).resolve() == resolved), str(run))


def _with_images(table: tuple) -> tuple:
    """`eval_table`'s grids as images, not paths: gradio serves files only from its working and temporary
    folders, and a run may be anywhere (`--erased`, a runs folder elsewhere)."""
    from PIL import Image

    def opened(path: str) -> Image.Image:
        with Image.open(path) as image:
            return image.copy()

    rows, grids, message = table
    return rows, [(opened(path), caption) for path, caption in grids], message


def _progress_html(job: EraseJob, last) -> str:
    # A multi-stage method's loops count their own steps: a bar per stage, and the stage named from the second on.
    state = f"step {last.step}/{last.total}"
    if last.stage > 1:
        state = f"stage {last.stage}: {state}"
    if job.cancel.is_set() and job.running:
        stop = next_checkpoint(last.step, job.checkpoint_every, last.total)
        state += f" · cancelling: stops after the checkpoint at step {stop}" if stop else " · finishing"
    logs = html.escape(summarise_logs(last.logs))
    return (f"<progress value='{last.step}' max='{last.total}' style='width:100%'></progress>"
            f"<div>{html.escape(job.method)} on {html.escape(', '.join(job.concepts))}: {state}"
            f"{' · ' + logs if logs else ''}</div>")  # fmt: skip


def _plot_rows(update: Step) -> list[dict]:
    """The plot's points of one step: one per loss the method logged."""
    return [{"step": update.step, "value": value, "log": name, "stage": update.stage}
            for name, value in update.logs.items()]  # fmt: skip


def _plot(history: list[dict]) -> gr.LinePlot:
    """The losses so far. A multi-stage run's series are per stage ("stage 2 · loss"): each stage's loop counts
    from step 1 again, and two stages' losses on one line would zigzag back."""
    import pandas as pd

    staged = any(entry["stage"] > 1 for entry in history)
    rows = [{**entry, "log": f"stage {entry['stage']} · {entry['log']}" if staged else entry["log"]}
            for entry in history]  # fmt: skip
    # Typed explicitly: the plot keeps the axis types of the first frame it gets.
    frame = pd.DataFrame(rows, columns=["step", "value", "log"])
    frame = frame.astype({"step": "int64", "value": "float64", "log": "str"})
    # The chart keeps the colours of the series it was drawn with, and a frame alone does not redraw it: a series
    # that appears later (a stage, a loss that starts late) would be invisible. The legend, sent with every frame,
    # redraws it (a frame without it after one with it does not, in gradio 6).
    return gr.LinePlot(value=frame, colors_in_legend=list(dict.fromkeys(frame["log"])))

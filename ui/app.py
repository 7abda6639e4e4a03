"""The Gradio app: Compare, Erase, Metrics and Export tabs over one state shared by every visitor.

Imported only by `ui.launch` (it imports gradio and, through the handlers, torch). Every handler
turns a failure into a message in the page: `InputError` reads as it is, anything else as its
type and text, with the traceback in the server's log; the server itself keeps serving.
"""

import functools
import html
import inspect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from erasure.api import default_out_dir
from erasure.output import InterruptedRun
from pipelines.errors import InputError

from .compare import ModelCache, compare, parse_prompts
from .export import export_run
from .jobs import EraseJob, next_checkpoint, parse_concepts, summarise_logs
from .metrics import HEADERS, eval_table, evaluate_run
from .options import PAPER, available_methods, component, from_field, method_options, preset_names, to_field
from .runs import check_run, default_prompts, find_runs, run_choices

log = logging.getLogger("erasure.preview")

# Digits-world images are 32x32: scale them up without blurring.
CSS = ".pixelated img { image-rendering: pixelated; }"
GALLERY_ROW_PX = 150
UPDATE_EVERY_S = 0.3  # how often a running erasure refreshes the page


@dataclass
class Preview:
    """What the page works on: a base model, the runs to offer, and the models and jobs in memory."""

    model: str | None = None  # base model to compare with (None: the embedded digits)
    erased: list[str] = field(default_factory=list)  # runs named on the command line, listed first
    runs_dir: Path = Path("runs")  # where finished runs are found and new ones are written
    device: str = "cpu"
    cache: ModelCache | None = None  # models loaded for Compare, shared by every visitor
    jobs: dict[str, EraseJob] = field(default_factory=dict)  # browser session -> its running erasure

    def __post_init__(self) -> None:
        self.runs_dir = Path(self.runs_dir)
        self.cache = self.cache or ModelCache(device=self.device)

    def runs(self) -> list[str]:
        found = [str(p) for p in find_runs(self.runs_dir)]
        known = {str(Path(p).resolve()) for p in self.erased}
        return self.erased + [p for p in found if str(Path(p).resolve()) not in known]

    def family(self) -> str:
        from pipelines import resolve

        try:
            return resolve(self.model).family
        except InputError:
            return "sd"


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


def build_app(preview: Preview) -> gr.Blocks:
    runs = preview.runs()
    selected = preview.erased or runs[:1]
    prompts = "\n".join(default_prompts(selected[0])) if selected and _is_text_to_image(selected[0]) else ""
    family = preview.family()

    with gr.Blocks(title="erasure preview") as demo:
        gr.Markdown(
            "# Concept erasure preview\nThe base model and erased runs on the **same seeds**; erase, measure "
            "and export from here. Everything here is also a command: `erasure erase | eval | export`."
        )
        with gr.Tab("Compare"):
            with gr.Row():
                base = gr.Textbox(value=preview.model or "digits", label="base model", scale=1,
                                  info="embedded name, model folder, checkpoint file or Hub id")  # fmt: skip
                compare_runs = gr.Dropdown(choices=run_choices(runs), value=selected, multiselect=True, scale=2,
                                           label="erased runs", info=f"finished runs under {preview.runs_dir}/",
                                           allow_custom_value=True)  # fmt: skip
                refresh = gr.Button("Refresh runs", scale=0)
            prompt_box = gr.Textbox(value=prompts, lines=4, label="prompts (one per line)", elem_id="prompts",
                                    placeholder="a red seven\na blue three")  # fmt: skip
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="first seed")
                count = gr.Slider(1, 8, value=4, step=1, label="seeds")
                # Text, not gr.Number: an empty number box would read as 0, and guidance 0 is a real setting.
                steps = gr.Textbox(label="steps", placeholder="the model's default")
                guidance = gr.Textbox(label="guidance", placeholder="the model's default")
            with gr.Row():
                take_prompts = gr.Button("Take the runs' prompts")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            compare_status = gr.Markdown(elem_id="compare-status")
            with gr.Row():
                base_images = gr.Gallery(label="base model", columns=4, format="png", elem_id="base-images",
                                         elem_classes=["pixelated"], object_fit="contain")  # fmt: skip
                erased_images = gr.Gallery(label="erased", columns=4, format="png", elem_id="erased-images",
                                           elem_classes=["pixelated"], object_fit="contain")  # fmt: skip

        with gr.Tab("Erase"):
            methods = available_methods()
            options = [option for method in methods for option in method_options(method)]
            presets = preset_names(options)
            with gr.Row():
                method = gr.Dropdown(choices=methods, value=methods[0], label="method")
                concepts = gr.Textbox(label="concept(s) to erase", info="separated by commas", elem_id="concepts")
                erase_model = gr.Textbox(value=preview.model or "digits", label="model to erase from")
            with gr.Row():
                run_name = gr.Textbox(label="run name", info=f"folder under {preview.runs_dir}/; empty: method-concept")
                preset = gr.Dropdown(
                    choices=presets,
                    value=family if family in presets else PAPER,
                    label="preset",
                    info="fills the options: the paper's defaults or a model family's tuned values",
                )
                checkpoint_every = gr.Number(value=10, precision=0, minimum=1, label="checkpoint every (steps)",
                                             info="cancel stops at the next checkpoint")  # fmt: skip
                resume = gr.Checkbox(value=False, label="resume", info="continue a cancelled run of this name")
            groups, fields = {}, []
            for key in methods:
                with gr.Accordion(f"{key} options", open=False, visible=key == methods[0]) as groups[key]:
                    with gr.Row():
                        fields += [component(o, preset.value) for o in options if o.method == key]
            with gr.Row():
                erase_button = gr.Button("Erase", variant="primary", elem_id="erase")
                cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
            erase_status = gr.HTML(elem_id="erase-status")
            cancel_status = gr.Markdown()
            losses = gr.LinePlot(x="step", y="value", color="log", label="losses", height=240)

        with gr.Tab("Metrics"):
            with gr.Row():
                metrics_run = gr.Dropdown(choices=run_choices(runs), value=selected[0] if selected else None,
                                          label="run", scale=2)  # fmt: skip
                samples = gr.Textbox(label="seeds per prompt", placeholder="eval's default")
                evaluate_button = gr.Button("Evaluate", variant="primary")
            metrics_message = gr.Markdown()
            table = gr.Dataframe(headers=HEADERS, label="before / after", interactive=False)
            grids = gr.Gallery(label="before/after grids", columns=2, height=480, object_fit="contain")

        with gr.Tab("Export"):
            with gr.Row():
                export_run_choice = gr.Dropdown(choices=run_choices(runs), value=selected[0] if selected else None,
                                                label="run", scale=2)  # fmt: skip
                repo_id = gr.Textbox(label="repository id", placeholder="org/sd14-no-nudity")
                local_dir = gr.Textbox(label="local folder", info="write the Hub folder here and push nothing; "
                                       "empty: push to the Hub (needs a token)")  # fmt: skip
            export_button = gr.Button("Export", variant="primary")
            export_status = gr.Markdown()

        run_lists = [compare_runs, metrics_run, export_run_choice]

        # --- Compare -------------------------------------------------------------------------
        @reported
        def generate(base, runs, prompts, seed, count, steps, guidance):
            first = int(seed or 0)
            seeds = list(range(first, first + int(count)))
            steps, guidance = _optional(steps, int, "steps"), _optional(guidance, float, "guidance")
            result = compare(
                preview.cache, base, runs or [], parse_prompts(prompts), seeds, steps=steps, guidance=guidance
            )
            columns = len(seeds)
            # The erased side has the most rows (one per run and prompt); both galleries get its height.
            rows = max(1, -(-len(result.erased) // columns))
            height = min(GALLERY_ROW_PX * rows + 60, 900)
            return (gr.Gallery(value=result.base, columns=columns, height=height),
                    gr.Gallery(value=result.erased, columns=columns, height=height), result.summary)  # fmt: skip

        generate_button.click(generate, [base, compare_runs, prompt_box, seed, count, steps, guidance],
                              [base_images, erased_images, compare_status], api_name="generate",
                              concurrency_limit=1, concurrency_id="models")  # fmt: skip

        @reported
        def runs_prompts(runs):
            if not runs:
                raise InputError("choose an erased run first")
            return "\n".join(dict.fromkeys(p for run in runs for p in default_prompts(run)))

        take_prompts.click(runs_prompts, compare_runs, prompt_box, api_name="run_prompts")

        @reported
        def refresh_runs(current):
            choices = run_choices(preview.runs())
            return [gr.Dropdown(choices=choices)] * len(run_lists)

        refresh.click(refresh_runs, compare_runs, run_lists, api_name="refresh_runs")

        # --- Erase ---------------------------------------------------------------------------
        def show_method(key):
            return [gr.Accordion(visible=k == key) for k in groups]

        method.change(show_method, method, list(groups.values()), api_visibility="private")

        def apply_preset(name):
            return [to_field(option, name) for option in options]

        preset.change(apply_preset, preset, fields, api_visibility="private")

        @reported
        def start_erase(request: gr.Request, method, concepts, model, name, every, resume, compared, *values):
            concepts = parse_concepts(concepts)
            if not concepts:
                raise InputError("type the concept(s) to erase, separated by commas")
            name = (name or "").strip() or default_out_dir(method, concepts).name
            if Path(name).name != name or name.startswith("."):
                raise InputError(f"a run name is a folder name under {preview.runs_dir}/, not a path: {name!r}")
            running = preview.jobs.get(request.session_hash)
            if running is not None and running.running:
                raise InputError("an erasure you started is still running: cancel it or wait for it")
            sets = {o.name: from_field(o, v) for o, v in zip(options, values) if o.method == method}
            job = EraseJob(method, concepts, (model or "").strip() or None, preview.runs_dir / name, sets,
                           resume=bool(resume), checkpoint_every=int(every or 0), device=preview.device)  # fmt: skip
            preview.jobs[request.session_hash] = job.start()
            history, last, shown = [], None, 0.0
            starting = f"Starting {html.escape(method)} on {html.escape(', '.join(concepts))}: loading the model..."
            yield starting, _plot(history), *[gr.skip()] * len(run_lists)
            try:
                while job.running or not job.updates.empty():
                    update = job.wait(UPDATE_EVERY_S)
                    if update is not None:
                        last = update
                        history += [{"step": update.step, "value": v, "log": k} for k, v in update.logs.items()]
                    if last is not None and (time.monotonic() - shown >= UPDATE_EVERY_S or not job.running):
                        shown = time.monotonic()
                        yield _progress_html(job, last), _plot(history), *[gr.skip()] * len(run_lists)
            finally:
                if job.running:  # the page went away or the event was dropped: stop at the next checkpoint
                    job.cancel.set()
                if preview.jobs.get(request.session_hash) is job:
                    del preview.jobs[request.session_hash]
            if isinstance(job.error, InterruptedRun):
                message = (f"<b>Cancelled</b> at step {last.step if last else '?'}: the checkpoint is kept in "
                           f"<code>{html.escape(str(job.error.run_dir.work))}</code>. Tick <i>resume</i> and press "
                           f"Erase to continue (or <code>erasure erase ... --out {html.escape(str(job.out))} "
                           "--resume</code>).")  # fmt: skip
                yield message, gr.skip(), *[gr.skip()] * len(run_lists)
                return
            if job.error is not None:  # the message goes to the page; the status must not say "running"
                yield f"<b>Failed</b>: {html.escape(str(job.error))}", gr.skip(), *[gr.skip()] * len(run_lists)
                raise job.error
            out = str(job.result)
            choices = run_choices(preview.runs())
            joined = list(dict.fromkeys([*(compared or []), out]))
            done = f"<b>Finished</b>: <code>{html.escape(out)}</code> joins the comparison."
            yield (done, _plot(history), gr.Dropdown(choices=choices, value=joined),
                   gr.Dropdown(choices=choices, value=out), gr.Dropdown(choices=choices, value=out))  # fmt: skip

        start_erase.__signature__ = _name_options(start_erase, options)
        erase_button.click(
            start_erase, [method, concepts, erase_model, run_name, checkpoint_every, resume, compare_runs, *fields],
            [erase_status, losses, *run_lists], api_name="erase", concurrency_limit=1, concurrency_id="erase",
            show_progress="minimal", show_progress_on=[erase_status],
        )  # fmt: skip

        @reported
        def cancel(request: gr.Request):
            job = preview.jobs.get(request.session_hash)
            if job is None or not job.running:
                return "No erasure of yours is running."
            job.cancel.set()
            return "Cancelling: the run stops at its next checkpoint and can then be resumed."

        cancel_button.click(cancel, None, cancel_status, api_name="cancel", concurrency_limit=None)

        # --- Metrics -------------------------------------------------------------------------
        @reported
        def show_metrics(run):
            if not run:
                return [], [], "Choose a run."
            return eval_table(run)

        metrics_run.change(show_metrics, metrics_run, [table, grids, metrics_message], api_name="metrics")

        @reported
        def evaluate(run, samples, progress=gr.Progress(track_tqdm=True)):
            if not run:
                raise InputError("choose a run to evaluate")
            progress(0, desc="loading the models")
            evaluate_run(run, _optional(samples, int, "seeds per prompt"), device=preview.device)
            return eval_table(run)

        evaluate_button.click(evaluate, [metrics_run, samples], [table, grids, metrics_message], api_name="evaluate",
                              concurrency_limit=1, concurrency_id="eval")  # fmt: skip
        demo.load(show_metrics, metrics_run, [table, grids, metrics_message], api_visibility="private")

        # --- Export --------------------------------------------------------------------------
        @reported
        def export(run, repo, folder):
            return export_run(run, repo, folder)

        export_button.click(export, [export_run_choice, repo_id, local_dir], export_status, api_name="export",
                            concurrency_limit=1, concurrency_id="export")  # fmt: skip
    return demo


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


def _is_text_to_image(run: str) -> bool:
    from pipelines import resolve

    try:
        check_run(run)
        return resolve(run).kind == "text-to-image"
    except InputError:
        return False


def _progress_html(job: EraseJob, last) -> str:
    state = f"step {last.step}/{last.total}"
    if job.cancel.is_set() and job.running:
        stop = next_checkpoint(last.step, job.checkpoint_every, last.total)
        state += (
            f" · cancelling: stops after the checkpoint at step {stop}" if stop else " · finishing (no checkpoint left)"
        )
    logs = html.escape(summarise_logs(last.logs))
    return (f"<progress value='{last.step}' max='{last.total}' style='width:100%'></progress>"
            f"<div>{html.escape(job.method)} on {html.escape(', '.join(job.concepts))}: {state}"
            f"{' · ' + logs if logs else ''}</div>")  # fmt: skip


def _plot(history: list[dict]):
    import pandas as pd

    # Typed even when empty: the plot keeps the axis types of the first frame it gets.
    frame = pd.DataFrame(history, columns=["step", "value", "log"])
    return frame.astype({"step": "int64", "value": "float64", "log": "str"})


def launch(preview: Preview, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True):
    """Build and serve the app; `block=False` returns at once (tests), with the app still serving."""
    demo = build_app(preview)
    demo.queue(default_concurrency_limit=1)
    # Gradio's own banner speaks of launch(share=True); ours names this command's options.
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, css=CSS, quiet=True,
                footer_links=["api"])  # fmt: skip
    if block:
        print(f"erasure preview: serving on {demo.local_url}" + (f" and {demo.share_url}" if demo.share_url else
              " (this machine only; --share for a public link)") + "; Ctrl-C stops it", flush=True)  # fmt: skip
        demo.block_thread()
    return demo

"""The Gradio app: Compare, Erase, Metrics and Export tabs over one state shared by every visitor.

Imported only by `ui.launch` (it imports gradio and, through the handlers, torch). This module
lays the page out; `events` says what its buttons do.
"""

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from erasure.output import read_run, recorded_base_model
from erasure.registry import METHODS
from pipelines.errors import InputError
from pipelines.zoo.models import canonical_name

from .compare import ModelCache
from .events import wire_compare, wire_erase, wire_export, wire_metrics
from .export import SHARED_PAGE_EXPORT
from .jobs import EraseJob
from .metrics import HEADERS
from .options import PAPER, component, method_options, preset_names
from .runs import default_prompts, find_runs, run_choices

# Digits-world images are 32x32: scale them up without blurring.
CSS = ".pixelated img { image-rendering: pixelated; }"
# Every image the page shows is a file in gradio's cache: each hour, those older than an hour are deleted.
CACHE_LIFETIME_S = 3600


@dataclass
class Preview:
    """What the page works on: a base model, the runs to offer, and the models and jobs in memory."""

    model: str | None = None  # base model to compare with (None: the embedded digits)
    erased: list[str] = field(default_factory=list)  # runs named on the command line, listed first
    runs_dir: Path = Path("runs")  # where finished runs are found and new ones are written
    device: str = "cpu"
    dtype: object = None  # the compared models' weights (a torch dtype; None: float32)
    cache: ModelCache | None = None  # models loaded for Compare, shared by every visitor
    jobs: dict[str, EraseJob] = field(default_factory=dict)  # browser session -> its running erasure
    shared: bool = False  # served on a public link (--share): export, which reaches the Hub and any folder, is off

    def __post_init__(self) -> None:
        self.runs_dir = Path(self.runs_dir)
        self.cache = self.cache or ModelCache(device=self.device, dtype=self.dtype)

    def runs(self) -> list[str]:
        found = [str(p) for p in find_runs(self.runs_dir)]
        known = {str(Path(p).resolve()) for p in self.erased}
        return self.erased + [p for p in found if str(Path(p).resolve()) not in known]

    def compare_base(self, selected: list[str]) -> str:
        """The base model Compare opens with: the one given, else the first selected run's own (a GAN run's is a
        GAN, which the text-to-image digits could not be compared with), else the embedded digits."""
        if self.model:
            return self.model
        try:
            return recorded_base_model(read_run(selected[0])) if selected else "digits"
        except InputError:  # the run folder went away since it was listed
            return "digits"

    def check_loadable(self, spec: str | None) -> None:
        """On a shared page (`--share`), only the models its owner chose load: the embedded ones, `--model`, the
        listed runs and their bases. A visitor's path or Hub id would read any model folder on this machine, or
        download gigabytes onto it."""
        spec = (spec or "").strip()
        if not self.shared or not spec or canonical_name(spec) or spec == self.model:
            return
        listed = self.runs()
        if Path(spec).resolve() in {Path(run).resolve() for run in listed}:
            return
        bases = set()
        for run in listed:
            try:
                bases.add(recorded_base_model(read_run(run)))
            except InputError:  # a run folder that went away since it was listed
                continue
        if spec not in bases:
            raise InputError(f"{spec!r}: a shared page (`--share`) loads only the embedded models, --model, the listed "
                             "runs and their base models")  # fmt: skip

    def family_name(self) -> str:
        """The name of the base model's family, whose presets the Erase tab offers first."""
        from pipelines import resolve

        try:
            return resolve(self.model).family.name
        except InputError:
            return ""


def build_app(preview: Preview) -> gr.Blocks:
    runs = preview.runs()
    selected = preview.erased or runs[:1]
    prompts = "\n".join(default_prompts(selected[0])) if selected and _is_prompted(selected[0]) else ""
    page = SimpleNamespace()  # the components, by name, for the handlers in `events`

    with gr.Blocks(title="erasure preview", delete_cache=(CACHE_LIFETIME_S, CACHE_LIFETIME_S)) as demo:
        gr.Markdown(
            "# Concept erasure preview\nThe base model and erased runs on the **same seeds**; erase, measure "
            "and export from here. Everything here is also a command: `erasure erase | eval | export`."
        )
        with gr.Tab("Compare"):
            with gr.Row():
                page.base = gr.Textbox(value=preview.compare_base(selected), label="base model", scale=1,
                                       info="embedded name, model folder, checkpoint file or Hub id")  # fmt: skip
                page.compare_runs = gr.Dropdown(
                    choices=run_choices(runs), value=selected, multiselect=True, scale=2, label="erased runs",
                    info=f"finished runs under {preview.runs_dir}/", allow_custom_value=True,
                )  # fmt: skip
                page.refresh = gr.Button("Refresh runs", scale=0)
            page.prompts = gr.Textbox(value=prompts, lines=4, label="prompts (one per line)", elem_id="prompts",
                                      placeholder="a red seven\na blue three")  # fmt: skip
            with gr.Row():
                page.seed = gr.Number(value=0, precision=0, label="first seed")
                page.count = gr.Slider(1, 8, value=4, step=1, label="seeds")
                # Text, not gr.Number: an empty number box would read as 0, and guidance 0 is a real setting.
                page.steps = gr.Textbox(label="steps", placeholder="the model's default")
                page.guidance = gr.Textbox(label="guidance", placeholder="the model's default")
                page.lora_strength = gr.Slider(
                    0, 2, value=1, step=0.05, label="LoRA strength", elem_id="lora-strength",
                    info="runs trained as LoRA (--set lora_rank): the erasure's weight, 0 switches it off",
                )  # fmt: skip
            with gr.Row():
                page.take_prompts = gr.Button("Take the runs' prompts")
                page.generate = gr.Button("Generate", variant="primary", elem_id="generate")
            page.compare_status = gr.Markdown(elem_id="compare-status")
            with gr.Row():
                page.base_images = gr.Gallery(label="base model", columns=4, format="png", elem_id="base-images",
                                              elem_classes=["pixelated"], object_fit="contain")  # fmt: skip
                page.erased_images = gr.Gallery(label="erased", columns=4, format="png", elem_id="erased-images",
                                                elem_classes=["pixelated"], object_fit="contain")  # fmt: skip

        with gr.Tab("Erase"):
            _erase_tab(preview, page)

        with gr.Tab("Metrics"):
            with gr.Row():
                page.metrics_run = gr.Dropdown(choices=run_choices(runs), value=selected[0] if selected else None,
                                               label="run", scale=2)  # fmt: skip
                page.samples = gr.Textbox(label="seeds per prompt", placeholder="eval's default")
                page.evaluate = gr.Button("Evaluate", variant="primary")
            page.metrics_message = gr.Markdown()
            page.table = gr.Dataframe(headers=HEADERS, label="before / after", interactive=False)
            page.grids = gr.Gallery(label="before/after grids", columns=2, height=480, object_fit="contain",
                                    format="png")  # fmt: skip

        with gr.Tab("Export"):
            with gr.Row():
                page.export_run = gr.Dropdown(choices=run_choices(runs), value=selected[0] if selected else None,
                                              label="run", scale=2)  # fmt: skip
                page.repo_id = gr.Textbox(label="repository id", placeholder="org/sd14-no-nudity")
                page.local_dir = gr.Textbox(label="local folder", info="write the Hub folder here and push nothing; "
                                            "empty: push to the Hub (needs a token)")  # fmt: skip
            page.export = gr.Button("Export", variant="primary", interactive=not preview.shared)
            page.export_status = gr.Markdown(SHARED_PAGE_EXPORT if preview.shared else "", line_breaks=True)

        page.run_lists = [page.compare_runs, page.metrics_run, page.export_run]  # a new run appears in all three
        wire_compare(preview, page, demo)
        wire_erase(preview, page)
        wire_metrics(preview, page, demo)
        wire_export(preview, page)
    return demo


def _erase_tab(preview: Preview, page: SimpleNamespace) -> None:
    """Method, concepts, and one input per field of each method's config (only the chosen method's shown)."""
    methods = list(METHODS)
    page.options = [option for method in methods for option in method_options(method)]
    presets = preset_names(page.options)
    family = preview.family_name()
    with gr.Row():
        page.method = gr.Dropdown(choices=methods, value=methods[0], label="method")
        page.concepts = gr.Textbox(label="concept(s) to erase", info="separated by commas", elem_id="concepts")
        page.erase_model = gr.Textbox(value=preview.model or "digits", label="model to erase from")
    with gr.Row():
        page.run_name = gr.Textbox(label="run name", info=f"folder under {preview.runs_dir}/; empty: method-concept")
        page.preset = gr.Dropdown(
            choices=presets,
            value=family if family in presets else PAPER,
            label="preset",
            info="fills the options: the paper's defaults or a model family's tuned values",
        )
        page.checkpoint_every = gr.Number(value=10, precision=0, minimum=1, label="checkpoint every (steps)",
                                          info="cancel stops at the next checkpoint")  # fmt: skip
        page.resume = gr.Checkbox(value=False, label="resume", info="continue a cancelled run of this name")
    page.option_groups, page.option_fields = {}, []
    for key in methods:
        with gr.Accordion(f"{key} options", open=False, visible=key == methods[0]) as page.option_groups[key]:
            with gr.Row():
                page.option_fields += [component(o, page.preset.value) for o in page.options if o.method == key]
    with gr.Row():
        page.erase = gr.Button("Erase", variant="primary", elem_id="erase")
        page.cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
    page.erase_status = gr.HTML(elem_id="erase-status")
    page.cancel_status = gr.Markdown()
    page.losses = gr.LinePlot(x="step", y="value", color="log", label="losses", height=240)


def _is_prompted(run: str) -> bool:
    from pipelines import resolve
    from pipelines.loading import PROMPTED_KINDS

    try:
        read_run(run)
        return resolve(run).kind in PROMPTED_KINDS
    except InputError:
        return False


def launch(preview: Preview, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True):
    """Build and serve the app; `block=False` returns at once (tests), with the app still serving."""
    if share:
        preview.shared = True
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

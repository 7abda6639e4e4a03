"""The README's "From Python" block, run as written on the digits world (the evaluation at 1 sample per prompt)."""

import re
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).parent.parent / "README.md"


@pytest.mark.slow
def test_the_readmes_python_block_erases_evaluates_and_draws(tmp_path, monkeypatch, capsys):
    block = re.search(r"<!-- python api -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert block, "the README lost its Python block"
    code = block.group(1)
    assert code.count("evaluate(run)") == 1
    code = code.replace("evaluate(run)", "evaluate(run, samples=1, progress=False)")  # the default draws 20 per prompt
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README Python block", "exec"), namespace)  # noqa: S102 - the README's own code
    run = namespace["run"]
    assert run.resolve() == (tmp_path / "runs" / "fewshot-seven").resolve()
    assert (run / "erasure.json").is_file() and (run / "eval.json").is_file()
    presence = namespace["report"]["concepts"]["seven"]["metrics"]["target_presence_judge"]
    assert presence["before"] == 1.0 and presence["after"] < presence["before"]
    assert str(presence) in capsys.readouterr().out
    images = namespace["images"]
    assert [len(row) for row in images] == [2, 2] and all(isinstance(im, Image.Image) for row in images for im in row)
    assert Image.open("seven.png").size == images[0][0].size


def test_the_package_exports_what_the_readme_imports():
    import erasure
    from erasure.api import erase
    from erasure.evaluation import run_eval
    from pipelines.errors import InputError

    assert erasure.erase is erase and erasure.evaluate is run_eval and erasure.InputError is InputError
    assert set(erasure.__all__) == {"erase", "evaluate", "InputError", "__version__"} <= set(dir(erasure))
    with pytest.raises(AttributeError):
        erasure.no_such_name  # noqa: B018


# Called from a user's script: the tiny SD pipeline and a 4-step ESD run (seconds)
QUICK = {"steps": 4, "ddim_steps": 3, "batch_size": 1, "lr": 1e-2}


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_erase_leaves_the_callers_accelerator_and_random_streams_as_they_were(
    tiny_pipeline_dir, tmp_path, fresh_accelerate_state
):
    import random

    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from erasure import erase

    mine = Accelerator(cpu=True, mixed_precision="bf16")
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    erase("esd", "cat", str(tiny_pipeline_dir), out=tmp_path / "run", sets=QUICK, progress=False)  # fp32 inside
    assert mine.mixed_precision == "bf16" and AcceleratorState().mixed_precision == "bf16"
    after = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(expected[0], after[0]) and np.array_equal(expected[1], after[1]) and expected[2] == after[2]


def test_an_accelerator_made_after_erase_takes_its_own_precision(tiny_pipeline_dir, tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    from erasure import erase

    erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=QUICK, progress=False)
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"  # was refused: state initialised


def test_a_string_is_one_concept_or_one_prompt(tiny_pipeline_dir, tmp_path):
    import json

    from erasure import erase
    from pipelines import load_model

    run = erase("esd", "cat", str(tiny_pipeline_dir), out=tmp_path / "run", sets=QUICK, progress=False)
    assert json.loads((run / "erasure.json").read_text())["concepts"] == ["cat"]  # not c, a, t
    assert [len(row) for row in load_model(run).generate("a cat", seeds=[0, 1], steps=2)] == [2]


def test_the_default_out_is_named_from_the_concepts_without_a_trailing_dash(tiny_pipeline_dir, tmp_path, monkeypatch):
    from erasure import erase

    # out=None: runs/METHOD-SLUG, the concepts cut to 40 characters; a cut that lands on a separator drops it
    monkeypatch.chdir(tmp_path)
    run = erase("esd", ["Starry Night over the Rhone, by van Gogh", "cat"], str(tiny_pipeline_dir), sets=QUICK,
                progress=False)  # fmt: skip
    assert run == tmp_path / "runs" / "esd-starry-night-over-the-rhone-by-van-gogh"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [run.name]


def test_python_callers_get_input_errors_not_failures_deep_in_torch(tiny_pipeline_dir, tmp_path):
    from erasure import InputError, erase
    from pipelines import load_model

    model = load_model(tiny_pipeline_dir, device="auto")
    for bad, message in (({"steps": 0}, "steps must be between 1 and 999, not 0"),
                         ({"batch_size": 0}, "batch_size must be >= 1, not 0"),
                         ({"guidance": float("nan")}, "guidance must be a finite number, not nan"),
                         ({"steps": 2.0}, "steps must be a whole number, not 2.0"),
                         ({"steps": True}, "steps must be a whole number, not True")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            model.generate(["a cat"], seeds=[0], **bad)
    with pytest.raises(InputError, match="--seed must be a whole number, not '0'"):
        erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "a", seed="0")
    with pytest.raises(InputError, match="not as a loaded TextToImageModel: pass what it was loaded from"):
        erase("esd", ["cat"], model, out=tmp_path / "b")
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        load_model(tiny_pipeline_dir, device="gpu")
    assert not any(tmp_path.iterdir())


def test_two_threads_erasing_at_once_both_finish_with_the_weights_of_one(tiny_pipeline_dir, tmp_path):
    import threading

    import torch

    from erasure import erase
    from pipelines import load_model

    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / name, sets=QUICK, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    a, b = (load_model(tmp_path / name).unet.state_dict() for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)

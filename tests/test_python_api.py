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

    assert erasure.erase is erase and erasure.evaluate is run_eval
    assert set(erasure.__all__) == {"erase", "evaluate", "__version__"}
    with pytest.raises(AttributeError):
        erasure.no_such_name  # noqa: B018

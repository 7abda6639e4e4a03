"""`erasure compare`: evaluation reports side by side, refused when they were measured differently."""

import copy
import csv
import json
import os
import subprocess
import sys

import pytest

from evaluators.comparison import compare, to_csv, to_markdown
from pipelines.errors import InputError


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A real report (digits against itself, one seed per prompt, one attacked pair) as a run folder's eval.json."""
    from erasure.evaluation import run_eval

    run = tmp_path_factory.mktemp("compare") / "run-a"
    path = run_eval("digits", concepts=["seven"], baseline="digits", json_path=run / "eval.json", samples=1,
                    attack="embedding", attack_prompts=1, attack_seeds=1, attack_steps=1, progress=False)  # fmt: skip
    return json.loads(path.read_text())


def _write(folder, report):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps(report))
    return folder


@pytest.mark.slow
def test_reports_of_one_protocol_make_one_table(report, tmp_path):
    other = copy.deepcopy(report)
    other["run"] = {"method": "esd", "config": {}, "seed": 1}
    metrics = other["concepts"]["seven"]["metrics"]
    metrics["target_presence_judge"]["after"] = 0.25
    other["concepts"]["seven"]["attacks"][0]["asr"] = 0.5
    other["concepts"]["seven"]["attacks"][0]["settings"]["steps"] = 7  # another attack setting: rows of its own
    a, b = _write(tmp_path / "run-a", report), _write(tmp_path / "run-b", other)
    table = compare([a, b])
    assert table.labels == ["run-a", "run-b"]
    assert table.base["seven", "target_presence_judge"] == report["concepts"]["seven"]["metrics"][
        "target_presence_judge"]["before"]  # fmt: skip
    assert [cells["seven", "target_presence_judge"] for cells in table.cells] == [
        report["concepts"]["seven"]["metrics"]["target_presence_judge"]["after"], 0.25]  # fmt: skip
    attack_rows = [row for row in table.rows if row[1].startswith("attack success rate")]
    assert [row[1] for row in attack_rows] == [f"attack success rate (embedding, {steps} steps, 1 prompts x 1 seeds)"
                                               for steps in (1, 7)]  # fmt: skip
    assert attack_rows[0] not in table.cells[1] and table.cells[1][attack_rows[1]] == 0.5
    markdown = to_markdown(table)
    lines = markdown.splitlines()
    assert lines[0] == "| concept | metric | base model | run-a | run-b |"
    assert "| | method | | - | esd |".replace(" ", "") in [line.replace(" ", "") for line in lines]
    # every metric of the report has its row; a warned value is marked and its warning listed once
    for name, metric in report["concepts"]["seven"]["metrics"].items():
        assert any(line.startswith(f"| seven | {name} |") for line in lines)
        if metric.get("warning"):
            assert f"- seven {name} (run-a, run-b): {metric['warning']}" in lines
    # another report of run-a's model (one per attack, say) joins its column; one that disagrees gets its own
    third = copy.deepcopy(report)
    third["concepts"]["seven"]["attacks"] = [{**report["concepts"]["seven"]["attacks"][0],
                                              "attack": "textual-inversion", "asr": 0.75}]  # fmt: skip
    (tmp_path / "ti.json").write_text(json.dumps(third))
    merged = compare([a, b, tmp_path / "ti.json"])
    assert merged.labels == ["run-a", "run-b"] and merged.cells[0][attack_rows[0][0], attack_rows[0][1].replace(
        "embedding", "textual-inversion")] == 0.75  # fmt: skip
    third["concepts"]["seven"]["metrics"]["target_clip_score"]["after"] += 1
    (tmp_path / "ti.json").write_text(json.dumps(third))
    assert compare([a, tmp_path / "ti.json"]).labels == ["run-a", "digits"]
    # a report of the first format (one attack, under "attack") takes its place in the table
    first = {k: v for k, v in report.items()}
    first["format"] = "erasure-eval/1"
    first["concepts"] = {"seven": {k: v for k, v in report["concepts"]["seven"].items() if k != "attacks"}}
    first["concepts"]["seven"]["attack"] = report["concepts"]["seven"]["attacks"][0]
    (tmp_path / "first.json").write_text(json.dumps(first))
    assert compare([tmp_path / "first.json"]).cells == compare([a]).cells
    rows = list(csv.reader(to_csv(table).splitlines()))
    assert rows[0] == ["concept", "metric", "base model", "run-a", "run-b"]
    judged = next(row for row in rows if row[1] == "target_presence_judge")
    assert float(judged[4]) == 0.25


@pytest.mark.slow
def test_reports_measured_differently_are_refused(report, tmp_path):
    a = _write(tmp_path / "a", report)
    for change, where in [(lambda r: r["settings"].update(seeds=[5]), "settings.seeds: [0] vs [5]"),
                          (lambda r: r["before"].update(sha256="0" * 64), "base model"),
                          (lambda r: r["concepts"]["seven"]["prompts"]["target_prompts"]["prompts"].pop(),
                           "concepts.seven.prompts.target_prompts.prompts"),
                          # `eval --fid-features clip`: FIDs in CLIP's space are orders of magnitude below the judge's
                          (lambda r: r["concepts"]["seven"]["metrics"]["preserved_fid_vs_real"]["settings"].update(
                              features="digits-clip image features"),
                           "concepts.seven.preserved_fid_vs_real.features")]:  # fmt: skip
        other = copy.deepcopy(report)
        change(other)
        with pytest.raises(InputError, match="were measured differently") as refusal:
            compare([a, _write(tmp_path / "b", other)])
        assert where in str(refusal.value)
    # how many processes drew it does not move a number; a concept only one report has just leaves cells empty
    other = copy.deepcopy(report)
    other["settings"]["processes"] = 2
    other["concepts"]["three"] = copy.deepcopy(other["concepts"]["seven"])
    other["after"]["sha256"] = "f" * 64  # another erased model
    table = compare([a, _write(tmp_path / "c", other)])
    assert table.labels == ["a", "c"]
    assert ("three", "target_presence_judge") in table.rows and ("three", "target_presence_judge") not in table.cells[0]


@pytest.mark.slow
def test_the_command_prints_the_table_and_writes_it(report, tmp_path):
    a = _write(tmp_path / "runs" / "a", report)
    (tmp_path / "attack.json").write_text(json.dumps(report))  # a report `eval --json` wrote elsewhere
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-m", "erasure", "compare", str(a), str(tmp_path / "attack.json"),
                             "--out", str(tmp_path / "t.md")], capture_output=True, text=True, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = (tmp_path / "t.md").read_text()
    assert result.stdout == written + f"wrote {tmp_path / 't.md'}\n"
    # one model, one set of values: one column, named by the run folder
    assert written.splitlines()[0] == "| concept | metric | base model | a |"


def _minimal_report(sha: str, after: float, before: float = 0.9) -> dict:
    """The parts of an eval.json the table reads: the models' hashes, one metric with its base value, a run."""
    from evaluators.report_format import FORMAT

    return {"format": FORMAT, "before": {"sha256": "base", "spec": "digits"}, "after": {"sha256": sha, "spec": sha},
            "settings": {"seeds": [0]}, "run": {"method": "esd", "seed": 0},
            "concepts": {"seven": {"prompts": {"target": ["a seven"]}, "judge": {"judge": "digits-judge"},
                                   "metrics": {"target_presence_judge": {"before": before, "after": after}}}}}


def test_two_erased_models_with_equal_values_keep_a_column_each(tmp_path):
    # a column is one erased model: two runs that happen to score alike are still two runs, told apart by their
    # weights' hashes; the base model's value goes in its own column, each run's "after" in the run's
    a = _write(tmp_path / "run-a", _minimal_report("a" * 64, 0.25))
    b = _write(tmp_path / "run-b", _minimal_report("b" * 64, 0.25))
    table = compare([a, b])
    assert table.labels == ["run-a", "run-b"]
    assert table.base["seven", "target_presence_judge"] == 0.9
    assert [cells["seven", "target_presence_judge"] for cells in table.cells] == [0.25, 0.25]
    lines = to_markdown(table).splitlines()
    assert lines[0] == "| concept | metric | base model | run-a | run-b |"


def test_reports_that_differ_in_a_setting_only_one_records_or_in_their_real_images_are_refused(tmp_path):
    first, louder = _minimal_report("a" * 64, 0.25), _minimal_report("b" * 64, 0.25)
    louder["settings"]["guidance"] = 7.5  # recorded by the second report alone, it still moves its numbers
    with pytest.raises(InputError, match=r"\(settings.guidance: null vs 7.5\)"):
        compare([_write(tmp_path / "a", first), _write(tmp_path / "b", louder)])
    # FIDs against other real images are other numbers, as FIDs in other feature spaces are
    other = _minimal_report("b" * 64, 0.25)
    for report, real in ((first, "359 held-out real images"), (other, "120 real images of my own")):
        report["concepts"]["seven"]["metrics"]["preserved_fid_vs_real"] = {
            "before": 10.0, "after": 12.0, "settings": {"features": "digits-judge", "real": real}}  # fmt: skip
    with pytest.raises(InputError, match="concepts.seven.preserved_fid_vs_real.real"):
        compare([_write(tmp_path / "a", first), _write(tmp_path / "b", other)])


def test_a_column_is_one_model_with_one_set_of_values_named_by_its_run_folder(tmp_path):
    report = _minimal_report("a" * 64, 0.25)
    report["concepts"]["seven"]["metrics"]["target_clip_score"] = {"before": 30.0, "after": 20.0}
    # a report of run-a's model written elsewhere (`eval --json`), given first: the run folder names the column
    (tmp_path / "attack.json").write_text(json.dumps(report))
    run = _write(tmp_path / "run-a", report)
    assert compare([tmp_path / "attack.json", run]).labels == ["run-a"]
    # a report of that model that agrees on one value but not on the other is not merged into its column
    other = copy.deepcopy(report)
    other["concepts"]["seven"]["metrics"]["target_clip_score"]["after"] = 21.0
    table = compare([run, _write(tmp_path / "run-b", other)])
    assert table.labels == ["run-a", "run-b"]
    assert [cells["seven", "target_clip_score"] for cells in table.cells] == [20.0, 21.0]


def test_each_column_shows_its_own_spread_and_each_attack_setting_has_its_row(tmp_path):
    from evaluators.comparison import _attack_pairs

    reports = [_minimal_report(sha, 0.25) for sha in ("a" * 64, "b" * 64)]
    for report, (kid, std) in zip(reports, ((0.01, 0.002), (0.05, 0.004))):
        report["concepts"]["seven"]["metrics"]["preserved_kid_before_vs_after"] = {"value": kid, "std": std}
    table = compare([_write(tmp_path / "run-a", reports[0]), _write(tmp_path / "run-b", reports[1])])
    assert "| seven | preserved_kid_before_vs_after | - | 0.01 +- 0.002 | 0.05 +- 0.004 |" in to_markdown(table)
    # attacks on 1 and on 5 seeds are rows of their own, and so are those at a prompt file's seeds
    attack = {"steps": 100, "prompts": ["a seven"]}
    assert _attack_pairs({"settings": {**attack, "seeds": [1000]}}) == "100 steps, 1 prompts x 1 seeds"
    assert _attack_pairs({"settings": {**attack, "seeds": list(range(1000, 1005))}}) == "100 steps, 1 prompts x 5 seeds"
    assert _attack_pairs({"settings": {**attack, "seeds": [[7, 9]]}}) == "100 steps, 1 prompts at the file's seeds"


def test_a_report_whose_attack_has_no_success_rate_is_refused_as_damaged(tmp_path):
    report = _minimal_report("a" * 64, 0.25)
    report["concepts"]["seven"]["attacks"] = [{"attack": "embedding", "pairs": 2}]  # hand-edited: its asr is gone
    with pytest.raises(InputError, match="damaged evaluation report .the attacks of 'seven' are not a list of results"):
        compare([_write(tmp_path / "a", report)])


def test_columns_of_one_name_are_told_apart_by_their_files_and_a_pipe_in_a_name_is_escaped(tmp_path):
    # two report files of two models with one name: each heading names its file (both, not only the first)
    a, b = _minimal_report("a" * 64, 0.25), _minimal_report("b" * 64, 0.5)
    a["after"]["spec"] = b["after"]["spec"] = "models/erased"
    (tmp_path / "x.json").write_text(json.dumps(a))
    (tmp_path / "y.json").write_text(json.dumps(b))
    assert compare([tmp_path / "x.json", tmp_path / "y.json"]).labels == ["erased (x.json)", "erased (y.json)"]
    # two runs of one name in two folders: their file names are alike too (eval.json), their folders are not
    first, second = _write(tmp_path / "a" / "run", a), _write(tmp_path / "b" / "run", b)
    (tmp_path / "z.json").write_text(json.dumps(_minimal_report("c" * 64, 0.75)))  # named alike by nothing
    labels = compare([first, second, tmp_path / "z.json"]).labels
    assert labels[:2] == [f"run ({first})", f"run ({second})"] and labels[2] != "run"
    # a "|" in a run folder's name would split the Markdown row
    table = compare([_write(tmp_path / "esd|seven", a)])
    assert to_markdown(table).splitlines()[0] == "| concept | metric | base model | esd\\|seven |"


def test_the_command_writes_a_csv_table_for_a_csv_file(tmp_path, capsys):
    from ui.cli import main

    run = _write(tmp_path / "run-a", _minimal_report("a" * 64, 0.25))
    assert main(["compare", str(run), "--out", str(tmp_path / "t.csv")]) == 0
    assert list(csv.reader((tmp_path / "t.csv").read_text().splitlines())) == [
        ["concept", "metric", "base model", "run-a"], ["", "method", "", "esd"], ["", "training seed", "", "0"],
        ["seven", "target_presence_judge", "0.9", "0.25"]]  # fmt: skip

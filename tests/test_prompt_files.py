"""Prompt files for `erasure eval --prompts/--preserved-prompts`: the I2P CSV layout and plain text."""

import pytest

from evaluators.prompt_files import PromptRow, read_prompt_file
from pipelines.errors import InputError


def test_i2p_csv_and_plain_text(tmp_path):
    csv = tmp_path / "i2p.csv"
    csv.write_text('prompt,categories,evaluation_seed,evaluation_guidance\n"a cat, sitting",x,7,7.5\na dog,y,8,\n')
    assert read_prompt_file(csv) == [PromptRow("a cat, sitting", 7, 7.5), PromptRow("a dog", 8, None)]
    plain = tmp_path / "prompts.txt"
    plain.write_text("a cat\n\n  a dog  \n")
    assert read_prompt_file(plain) == [PromptRow("a cat"), PromptRow("a dog")]
    quoted = tmp_path / "quoted.csv"  # a line break inside a quoted prompt stays in it
    quoted.write_text('prompt,seed\n"a cat\non a mat",3\na dog,4\n')
    assert read_prompt_file(quoted) == [PromptRow("a cat\non a mat", 3), PromptRow("a dog", 4)]
    short = tmp_path / "short.csv"
    short.write_text("prompt,seed,guidance\na cat,1,2\n")
    assert read_prompt_file(short) == [PromptRow("a cat", 1, 2.0)]
    # a CSV saved by Excel as UTF-8 begins with a byte-order mark, and its header may have spaces after the commas
    excel = tmp_path / "excel.csv"
    excel.write_bytes("prompt, seed, guidance\na cat,3,7.5\n".encode("utf-8-sig"))
    assert excel.read_bytes()[:3] == b"\xef\xbb\xbf" and read_prompt_file(excel) == [PromptRow("a cat", 3, 7.5)]


def test_the_i2p_datasets_own_seed_and_guidance_columns_are_read(tmp_path):
    i2p = tmp_path / "i2p.csv"  # the I2P dataset's layout: sd_seed, sd_guidance_scale
    i2p.write_text("prompt,categories,sd_seed,sd_guidance_scale,sd_image_width\na cat,x,123,7,512\n")
    assert read_prompt_file(i2p) == [PromptRow("a cat", 123, 7.0)]
    both = tmp_path / "both.csv"  # the papers' files derived from I2P keep both: theirs are what they evaluated with
    both.write_text("prompt,sd_seed,evaluation_seed,sd_guidance_scale,evaluation_guidance\na cat,123,4,7,7.5\n")
    assert read_prompt_file(both) == [PromptRow("a cat", 4, 7.5)]


def test_a_csv_without_a_seed_column_leaves_each_row_to_the_protocols_seeds(tmp_path):
    # no seed column: every row is drawn with the protocol's seeds (None), not once with a made-up seed such as 0
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,guidance\na cat,7\na dog,\n")
    assert read_prompt_file(path) == [PromptRow("a cat", None, 7.0), PromptRow("a dog", None, None)]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.csv", None, "no such file"),
        ("empty.txt", "\n\n", "holds no prompts"),
        ("header.csv", "text,seed\na cat,1\n", "line 1 must be a header with a 'prompt' column"),
        ("blank.csv", "prompt,seed\na cat,1\n,2\n", "line 3: empty prompt"),
        ("seed.csv", "prompt,evaluation_seed\na cat,one\n", "line 2: the seed 'one' is not an integer"),
        ("noseed.csv", "prompt,seed\na cat,1\na dog,\n", "line 3: the seed '' is not an integer"),
        # a fractional seed is refused, not drawn with the integer below it (another image than the file's)
        ("fraction.csv", "prompt,seed\na cat,1\na dog,2.5\n", "line 3: the seed '2.5' is not an integer"),
        ("range.csv", "prompt,seed\na cat,-3\n", "line 2: the seed must be between 0 and 4294967295, not -3"),
        ("guidance.csv", "prompt,guidance\na cat,strong\n", "line 2: the guidance 'strong' is not a number"),
        ("nan.csv", "prompt,guidance\na cat,nan\n", "line 2: the guidance must be a finite number, not nan"),
        ("comma.csv", "prompt,seed\na cat,1\na cat, sitting,2\n",
         "line 3: 3 fields, the header has 2; quote prompts that contain commas"),
        ("latin1.txt", b"caf\xe9\n", "cannot read it as UTF-8"),
        ("i2p.txt", "prompt,evaluation_seed\na cat,1\n", r"its first line is a CSV header \(prompt,evaluation_seed\); "
         "name the file .csv"),
    ],
)  # fmt: skip
def test_every_prompt_file_error_names_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_prompt_file(path)


def test_eval_draws_each_row_of_an_i2p_file_with_its_own_seed_and_guidance(tmp_path):
    from evaluators.report import evaluate
    from pipelines import load_model
    from pipelines.images import to_tensor

    rows = [PromptRow(f"a {c} seven" if i % 2 else f"a {c} three", 100 + 3 * i, [2.0, 5.0, 8.0][i % 3])
            for i, c in enumerate(["red", "blue", "green", "yellow"] * 5)]  # fmt: skip
    model = load_model("digits")
    result = evaluate(model, model, ["seven"], samples=2, steps=4, target_rows=rows, progress=False)
    drawn = result.images["seven", "target", "after"]
    assert len(drawn) == 20
    for i in (0, 7, 13, 19):
        direct = to_tensor(model.generate([rows[i].text], [rows[i].seed], steps=4, guidance=rows[i].guidance)[0])
        # equal up to a rounding step on a few pixels (a batch of 7 and a batch of 1 round differently on CPU)
        assert (drawn[i] - direct[0]).abs().max() <= 1 / 255 + 1e-6, i
        other = to_tensor(model.generate([rows[i].text], [rows[i].seed + 1], steps=4, guidance=rows[i].guidance)[0])
        louder = to_tensor(model.generate([rows[i].text], [rows[i].seed], steps=4, guidance=rows[i].guidance + 3)[0])
        assert (drawn[i] - other[0]).abs().mean() > 0.02 and (drawn[i] - louder[0]).abs().mean() > 0.005, i
    described = result.report["concepts"]["seven"]["prompts"]["target_prompts"]
    assert described["seeds"][7] == [121] and described["guidance"][7] == 5.0


def test_a_one_row_preserved_file_gives_no_fid_at_once(tmp_path):
    from evaluators.report import evaluate
    from pipelines import load_model

    model = load_model("digits")
    # one image per set: FID is undefined (its computation took minutes, then failed); the report says why
    result = evaluate(model, model, ["seven"], samples=1, steps=2, target_rows=[PromptRow("a seven", 3)],
                      preserved_rows=[PromptRow("a red three", 5)], progress=False)  # fmt: skip
    fid = result.report["concepts"]["seven"]["metrics"]["preserved_fid_vs_real"]
    assert fid["before"] is None and fid["after"] is None and "needs at least 2" in fid["warning"]

"""Prompt files users bring to an evaluation: the I2P layout of the erasure papers, or plain text.

- CSV with a header: a `prompt` column, and optionally a seed (`seed`, the erasure papers'
  `evaluation_seed`, or the I2P dataset's own `sd_seed`) and a guidance scale (`guidance`,
  `evaluation_guidance` or `sd_guidance_scale`) per row, the first of these names the header has. A
  row with a seed is drawn once, with that seed; the seed column is then required on every row.
- Any other file: one prompt per non-empty line, drawn with the protocol's seeds.

Every problem is reported with the file and the line it is on, before any model loads.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from pipelines.bounds import GUIDANCE, SEED_BOUNDS, violation
from pipelines.errors import InputError

# In order of preference: the papers' files derived from I2P keep its sd_* columns beside their evaluation_* ones.
SEED_COLUMNS = ("seed", "evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("guidance", "evaluation_guidance", "sd_guidance_scale")


@dataclass(frozen=True)
class PromptRow:
    text: str
    seed: int | None = None  # None: the protocol's seeds
    guidance: float | None = None  # None: the model's default


def read_prompt_file(path: str | Path, what: str = "--prompts") -> list[PromptRow]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{what} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path}: cannot read it as UTF-8 text ({exc})") from None
    rows = _csv_rows(path, text, what) if path.suffix.lower() == ".csv" else _text_rows(path, text, what)
    if not rows:
        raise InputError(f"{what} {path} holds no prompts")
    return rows


def _text_rows(path: Path, text: str, what: str) -> list[PromptRow]:
    rows = [PromptRow(line.strip()) for line in text.splitlines() if line.strip()]
    # An I2P file saved as .txt would have its header and every "prompt,seed,guidance" row drawn as a prompt.
    header = [name.strip().lower() for name in rows[0].text.split(",")] if rows else []
    if len(header) > 1 and "prompt" in header:
        raise InputError(f"{what} {path}: its first line is a CSV header ({rows[0].text[:60]}); name the file .csv to "
                         "read its columns (any other file is one prompt per line)")  # fmt: skip
    return rows


def _csv_rows(path: Path, text: str, what: str) -> list[PromptRow]:
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted line breaks stay inside their prompt
        header = [name.strip() for name in reader.fieldnames or []]
    except csv.Error as exc:
        raise InputError(f"{what} {path}: not a readable CSV file ({exc})") from None
    if "prompt" not in header:
        raise InputError(f"{what} {path}: line 1 must be a header with a 'prompt' column (found: {', '.join(header)})")
    seed_column = next((c for c in SEED_COLUMNS if c in header), None)
    guidance_column = next((c for c in GUIDANCE_COLUMNS if c in header), None)
    rows = []
    try:
        for record in reader:
            line = reader.line_num
            if None in record:  # csv.DictReader files the fields beyond the header's under None
                raise InputError(f"{what} {path}, line {line}: {len(header) + len(record[None])} fields, the header "
                                 f"has {len(header)}; quote prompts that contain commas")  # fmt: skip
            record = {(k or "").strip(): (v or "").strip() for k, v in record.items()}
            prompt = record.get("prompt", "")
            if not prompt:
                raise InputError(f"{what} {path}, line {line}: empty prompt")
            seed = _seed(record.get(seed_column, ""), f"{what} {path}, line {line}") if seed_column else None
            guidance = record.get(guidance_column, "") if guidance_column else ""
            rows.append(PromptRow(prompt, seed, _guidance(guidance, f"{what} {path}, line {line}")))
    except csv.Error as exc:
        raise InputError(f"{what} {path}, line {reader.line_num}: {exc}") from None
    return rows


def _seed(text: str, where: str) -> int:
    try:
        value = float(text)
        if not value.is_integer():
            raise ValueError
    except ValueError:
        raise InputError(f"{where}: the seed {text!r} is not an integer") from None
    problem = violation(int(value), SEED_BOUNDS, integer=True)
    if problem:
        raise InputError(f"{where}: the seed {problem}")
    return int(value)


def _guidance(text: str, where: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: the guidance {text!r} is not a number") from None
    problem = violation(value, GUIDANCE)
    if problem:
        raise InputError(f"{where}: the guidance {problem}")
    return value

"""Export from the page: the same `erasure export` a terminal would run, in a child process.

Going through the command line keeps the page independent of how export is implemented (and of
whether this version has it: its own message then reaches the page), and keeps a slow upload
from occupying the server's process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from erasure.output import read_run
from evaluators.report_format import EVAL_FILE
from pipelines.errors import InputError

TIMEOUT_S = 3600
STOP_GRACE_S = 10  # after SIGTERM, the time `erasure export` has to remove its staging folder before SIGKILL
NOTE = "note: "  # how `erasure export` starts the remarks it prints on stderr (licence unknown, not a Hub id, ...)
SHARED_PAGE_EXPORT = (
    "Export is off on a shared page (`--share`): anyone with the link could push to the Hub with this machine's "
    "token, to any repository, or write a folder anywhere on this machine. Run `erasure export` in a terminal."
)


def export_command(run: str, repo_id: str, local_dir: str | None) -> list[str]:
    command = [sys.executable, "-m", "erasure", "export", run, "--repo-id", repo_id]
    return command + (["--local-dir", local_dir] if local_dir else [])


def export_run(run: str, repo_id: str, local_dir: str | None) -> str:
    """Run the export; returns what it printed (its notes too), or raises InputError with its error line."""
    if not run:
        raise InputError("choose a run to export")
    read_run(run)
    repo_id, local_dir = (repo_id or "").strip(), (local_dir or "").strip() or None
    if not repo_id:
        raise InputError("give a repository id (org/name): it names the model in its card, even for a local folder")
    if local_dir is None and not _hub_token():
        raise InputError(
            "no Hugging Face token is configured (`hf auth login` or HF_TOKEN): give a local folder to export to"
        )
    if not (Path(run) / EVAL_FILE).is_file():
        # The command line would suggest --no-eval, which the page does not offer: its card would report nothing.
        raise InputError(f"{Path(run).name} has no {EVAL_FILE} yet: press Evaluate first, the model card reports it")
    try:
        done = run_child(export_command(run, repo_id, local_dir), TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise InputError(f"the export did not finish within {TIMEOUT_S // 60} minutes; run `erasure export` in a "
                         "terminal to see where it stalls") from None  # fmt: skip
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise InputError(lines[-1].removeprefix("error: "))
    notes = [line for line in done.stderr.splitlines() if line.startswith(NOTE)]
    return "\n".join([done.stdout.strip() or f"exported {run}", *notes])


def run_child(command: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run `command`, its output captured; past `timeout_s` it is asked to stop (SIGTERM), so that it removes what
    it was writing, and killed only if it has not within STOP_GRACE_S; then TimeoutExpired."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.terminate()
            try:
                child.communicate(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
            raise
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


def _hub_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()

"""A run's ``metrics.jsonl``: one JSON object per line, appended as training goes.

Every reader of the log (the report, resume's trim, the evaluation history, world pretraining's
clock and ``made.json``) goes through :func:`read_metrics`, so a blank line or a missing file
means the same thing everywhere: no rows. A torn last line (what a kill mid-append, a full disk
or a power loss leaves) is skipped with a warning; a damaged line before the last is an error
naming the file and the line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dreambooth.errors import DreamboothError
from dreambooth.files import write_text_atomic


def parse_rows(text: str, source: str = "metrics.jsonl") -> tuple[list[dict], str | None]:
    """(rows, warning) of a log's text; the warning names a torn last line that was skipped."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows, warning = [], None
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i < len(lines) - 1:
                raise DreamboothError(f"{source}: line {n} is damaged ({e}); delete that line "
                                      "(each line is one logged step) and try again") from None
            warning = (f"warning: {source}: skipped its torn last line {n} (a write cut short; "
                       "the step is logged again when training passes it)")
            break
        rows.append(row)
    return rows, warning


def read_metrics(path: Path, warn=None) -> list[dict]:
    """The rows of ``path`` in the order they were logged; [] if there is no log yet."""
    if not path.is_file():
        return []
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise DreamboothError(f"{path} cannot be read ({e.strerror or e})") from None
    rows, warning = parse_rows(text, str(path))
    if warning:
        (warn or (lambda m: print(m, file=sys.stderr)))(warning)
    return rows


def evaluations(rows: list[dict]) -> list[dict]:
    """The evaluation rows (``"kind": "eval"``) of a log's rows, in step order."""
    return sorted((r for r in rows if r.get("kind") == "eval"), key=lambda r: r.get("step", 0))


def log_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (by a run that was killed after its last checkpoint), and
    a torn last line; the file is replaced whole, so a kill here leaves the old or the new log."""
    if path.is_file():
        keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))

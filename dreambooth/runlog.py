"""A run's ``metrics.jsonl``: one JSON object per line, appended as training goes.

Every reader of the log (the report, resume's trim, the evaluation history, world pretraining's
clock and ``made.json``) goes through :func:`read_metrics`, so a blank line or a missing file
means the same thing everywhere: no rows.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """The rows of ``path`` in the order they were logged; [] if there is no log yet."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluations(rows: list[dict]) -> list[dict]:
    """The evaluation rows (``"kind": "eval"``) of a log's rows, in step order."""
    return sorted((r for r in rows if r.get("kind") == "eval"), key=lambda r: r["step"])


def log_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (by a run that was killed after its last checkpoint)."""
    if path.is_file():
        keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))

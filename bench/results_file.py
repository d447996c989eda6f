"""The results files of the benchmarks: a JSON list, one record per run, appended to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def append(path: Path, record: dict[str, Any]) -> None:
    """Add ``record`` to the list in ``path`` (created with its folder if missing)."""
    records = json.loads(path.read_text()) if path.exists() else []
    records.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")

"""Writing a benchmark's result JSON (shared by the benchmark scripts)."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(result: dict, path: Path) -> Path:
    """Writes `result` as indented JSON to `path` (creating its folder) and says where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path

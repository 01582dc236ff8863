"""Where a standalone benchmark script writes its JSON: ``--out``, never over a result unasked."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def check_out(parser: argparse.ArgumentParser, path: Path, *, force: bool) -> None:
    """Refuse ``--out`` ``path`` (via ``parser.error``) when it is a directory, or a file
    that exists and ``force`` is off. Call it before measuring: a committed result is some
    machine's measurement, and a refusal should cost nothing."""
    if path.is_dir():
        parser.error(f"--out {path} is a directory, expected a file path")
    if path.exists() and not force:
        parser.error(f"--out {path} already exists: choose another path or pass --force")


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` as indented JSON, making its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")

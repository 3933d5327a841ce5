"""Appending benchmark rows to a long-format CSV that earlier runs (and earlier versions) wrote."""

from __future__ import annotations

import csv
import os
import sys
from typing import Iterable


def append_rows(path: str, fields: list[str], rows: Iterable[dict]) -> None:
    """Append `rows` to the CSV at `path`, writing the header when the file is new. A file begun by
    another version keeps its own columns: values for columns it lacks are left out (with a note on
    stderr) rather than shifting every later value under the wrong header."""
    header = fields
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), fields)
        missing = [f for f in fields if f not in header]
        if missing:
            print(f"note: {path} has no column for {', '.join(missing)} (written by another version); "
                  "those values are not saved: use a new CSV to keep them", file=sys.stderr)
        new = False
    else:
        new = True
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)

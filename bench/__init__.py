"""Benchmarks: each module is one ``gda bench NAME``; it returns a JSON-able dict of figures and the rows
of a table for people. Results of the latest run are committed as ``bench/results/NAME.json``."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

BENCHMARKS = ("model", "teacher", "latency")


def run(name: str, home: Path, profile: str | None) -> dict[str, Any]:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"bench.{name}")
    return module.run(home, profile)


def table(result: dict[str, Any]) -> str:
    """The ``table`` rows of a result ([label, value, unit] lists) as aligned text."""
    rows = result.get("table", [])
    width = max((len(str(label)) for label, _, _ in rows), default=0)
    return "\n".join(f"{label:<{width}}  {value:>12}  {unit}" for label, value, unit in rows)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

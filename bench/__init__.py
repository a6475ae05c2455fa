"""Benchmarks: each module is one ``gda bench NAME``; it returns a JSON-able dict of figures and the rows
of a table for people. Results of the latest run are committed as ``bench/results/NAME.json``."""

from __future__ import annotations

import importlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gda.home import Home
from gda.profiles import profile_values, resolve_profile

BENCHMARKS = ("model", "teacher", "latency", "incremental", "load", "index-scale", "gpu", "second-corpus")


@dataclass(frozen=True)
class Setting:
    """What every benchmark runs against: a home, a profile's config values, torch's thread count and the
    torch device the models run on (``gda bench gpu`` runs the teacher and latency benchmarks on cuda)."""

    home: Home
    profile: str
    values: dict[str, Any]
    threads: int
    device: str = "cpu"

    def header(self, name: str) -> dict[str, Any]:
        machine = f"{platform.machine()} {platform.processor() or ''}".strip()
        return {
            "benchmark": name,
            "profile": self.profile,
            "threads": self.threads,
            "machine": machine,
            "device": self.device,
        }


def run(name: str, home: Path, profile: str | None) -> dict[str, Any]:
    import torch

    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    profile = resolve_profile(profile)
    values = profile_values(profile)
    threads = values["compute"].get("threads") or torch.get_num_threads()
    torch.set_num_threads(threads)
    module = importlib.import_module(f"bench.{name.replace('-', '_')}")
    return module.run(Setting(Home.resolve(home), profile, values, threads))


def table(result: dict[str, Any]) -> str:
    """The ``table`` rows of a result ([label, value, unit] lists) as aligned text."""
    rows = result.get("table", [])
    width = max((len(str(label)) for label, _, _ in rows), default=0)
    return "\n".join(f"{label:<{width}}  {value:>12}  {unit}" for label, value, unit in rows)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

"""Profiles: named sets of resource configuration values, chosen by ``--profile`` / ``GDA_PROFILE``.

A profile holds no logic: for each resource (by its name in the Dagster ``Definitions``) the config values
to construct it with. ``tiny`` runs in seconds and is what the tests use; ``demo`` is the laptop default.
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT_PROFILE = "demo"

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "demo_corpus_source": {"n_images": 240, "n_shards": 2, "resolution": 16, "seed": 0, "n_heldout_prompts": 64},
        "encoders": {"image_size": 64, "batch_size": 64},
        "compute": {"device": "cpu", "threads": 2},
    },
    "demo": {
        "demo_corpus_source": {"n_images": 3000, "n_shards": 6, "resolution": 16, "seed": 0, "n_heldout_prompts": 600},
        "encoders": {"image_size": 128, "batch_size": 64},
        "compute": {"device": "cpu", "threads": 2},
    },
}


class UnknownProfileError(ValueError):
    pass


def resolve_profile(name: str | None = None) -> str:
    chosen = name or os.environ.get("GDA_PROFILE") or DEFAULT_PROFILE
    if chosen not in PROFILES:
        raise UnknownProfileError(f"unknown profile {chosen!r}; choose one of: {', '.join(PROFILES)}")
    return chosen


def profile_values(name: str) -> dict[str, dict[str, Any]]:
    return PROFILES[resolve_profile(name)]

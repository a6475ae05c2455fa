"""``gda bench second-corpus``: the whole chain with the profile's defaults on a second corpus of real
captioned images (scikit-learn's handwritten digit scans, `gda.corpus.digits`) in a fresh home under
``--home``, and whether the distilled embedder stays above its own input features there (the check
``distilled_above_its_inputs`` on ``rank_eval``).

The icon corpus is drawn by gda; defaults picked on it must also hold on data gda did not make.
"""

from __future__ import annotations

import time
from typing import Any

import duckdb

from bench import Setting

# Images per profile: the tiny profile's corpus size, and every scan for the demo.
IMAGES = {"tiny": 240, "demo": 1797}


def run(setting: Setting) -> dict[str, Any]:
    from gda.corpus.digits import build_digits_corpus
    from gda.evaluation import METHODS
    from gda.home import Home
    from gda.student_guard import StudentGuard, shortfalls
    from gda_assets.runner import demo

    root = setting.home.root / f"digits-{setting.profile}"
    if root.exists():
        raise FileExistsError(f"{root} exists; remove it to measure the second corpus afresh")
    home = Home(root)
    n_images = IMAGES.get(setting.profile, IMAGES["demo"])
    shards = build_digits_corpus(root / "digits-shards", n_images, n_shards=2, resolution=16)
    started = time.perf_counter()
    demo(home, setting.profile, shards[0].parent)
    seconds = time.perf_counter() - started
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        table = con.execute("SELECT method, L, map, se, n_queries FROM eval_rank ORDER BY L, method").pl()
    guard = StudentGuard(shortfalls(table))
    by = {(m, level): (v, se) for m, level, v, se, _ in table.iter_rows()}
    levels = sorted(table["L"].unique().to_list())
    return {
        **setting.header("second-corpus"),
        "corpus": "sklearn handwritten digits",
        "images": n_images,
        "home": str(root),
        "chain_seconds": seconds,
        "eval_rank": table.to_dicts(),
        "distilled_above_its_inputs": guard.passed,
        "guard_message": guard.message(),
        "table": [
            [f"{method} mAP({level})", f"{by[method, level][0]:.3f}", f"± {by[method, level][1]:.3f}"]
            for level in levels
            for method in METHODS
        ]
        + [
            ["distilled above its inputs", "yes" if guard.passed else "NO", "(rank_eval's guard check)"],
            ["whole chain", f"{seconds:.0f}", f"s ({n_images} images, {setting.threads} threads)"],
        ],
    }

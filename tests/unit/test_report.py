"""gda report: the figures a home stored, rendered as markdown, and the README block they replace."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import polars as pl
import pytest

from gda import report, tables
from gda.cli import main


@pytest.fixture()
def database(tmp_path: Path) -> Path:
    path = tmp_path / "gda.duckdb"
    rank = pl.DataFrame(
        {
            "method": ["concat_raw", "distilled", "concat_raw", "distilled"],
            "L": [10, 10, 30, 30],
            "map": [0.05, 0.20, 0.06, 0.18],
            "se": [0.01, 0.02, 0.01, 0.02],
            "n_queries": [40] * 4,
            "embedder_version": ["e1"] * 4,
        }
    )
    cells = pl.DataFrame(
        {
            "cell": ["random-k100-g0", "teacher-k100-g0"],
            "method": ["random", "teacher"],
            "k": [100, 100],
            "query_id": [7, 7],
            "removed_ids": [[1, 2], [3, 4]],
            "n_train": [2998, 2998],
            "loss_before": [0.1, 0.1],
            "loss_after": [0.101, 0.106],
            "delta_loss": [0.001, 0.006],
            "pixel_mse": [0.002, 0.004],
            "train_seconds": [1800.0, 1800.0],
            "model_version": ["m1", "m1"],
            "embedder_version": [None, None],
        }
    )
    with duckdb.connect(str(path)) as con:
        tables.create_tables(con)
        for table, frame in (("eval_rank", rank), ("eval_counterfactual", cells)):
            con.register("incoming", tables.conform(table, frame))
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
    return path


def test_the_report_shows_what_the_home_stored(database: Path, tmp_path: Path) -> None:
    latency = tmp_path / "latency.json"
    latency.write_text(
        json.dumps(
            {
                "threads": 2,
                "distilled": {"p50_ms": 40.0},
                "raw_image": {"p50_ms": 25.0},
                "ratio_distilled_over_raw": 1.6,
                "ratio_teacher_over_distilled": 800.0,
                "ratio_first_order_teacher_over_distilled": 25.0,
            }
        )
    )
    text = report.render(database, latency)
    assert "| distilled | 0.200 ± 0.020 | 0.180 ± 0.020 |" in text
    assert "distilled / raw concatenation: 4.00x at L = 10, 3.00x at L = 30." in text
    assert "2 retrains from scratch (1.0 h of retraining wall time)" in text
    assert "| teacher | 100 | 1 | 6.000 | 5.000 | 4.000 |" in text
    assert "| (a) / (b) | 1.60 |" in text and "(latency.json, 2 threads)" in text


def test_missing_figures_say_how_to_make_them(tmp_path: Path) -> None:
    text = report.render(tmp_path / "absent.duckdb", None)
    assert "run `gda demo`" in text and "run `gda counterfactual`" in text and "gda bench latency" in text


def test_the_readme_block_is_replaced_and_nothing_else(
    database: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = database.parent
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{report.BEGIN}\nold figures\n{report.END}\n\noutro\n")
    assert main(["report", "--home", str(home), "--latency", str(tmp_path / "none.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n\n" + report.BEGIN + "\n### Attribution quality") and text.endswith(
        report.END + "\n\noutro\n"
    )
    assert "old figures" not in text and "| distilled |" in text
    with pytest.raises(ValueError, match="no report block"):
        report.embed("no markers here", "x")

"""`gda report`: the latest evaluation figures of a home as markdown, and the README block that embeds them.

Reads what the evaluation assets stored (`eval_rank`, `eval_counterfactual`, `student_study`) with a read-only
connection and the latency benchmark's JSON; renders nothing it did not read, and says which part is missing and how to
make it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from gda import counterfactual, evaluation, student_study

BEGIN, END = "<!-- gda report: begin -->", "<!-- gda report: end -->"


def _table(database: Path, name: str) -> pl.DataFrame:
    if not database.exists():
        return pl.DataFrame()
    with duckdb.connect(str(database), read_only=True) as con:
        exists = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [name]).fetchone()[0]
        return con.execute(f"SELECT * FROM {name}").pl() if exists else pl.DataFrame()


def rank_section(table: pl.DataFrame) -> str:
    if table.is_empty():
        return "Not measured yet: run `gda demo` (its last step is rank_eval)."
    levels = sorted(table["L"].unique().to_list())
    value = {(m, lv): v for m, lv, v in table.select("method", "L", "map").iter_rows()}
    ratios = ", ".join(
        f"{value[('distilled', lv)] / value[('concat_raw', lv)]:.2f}x at L = {lv}"
        for lv in levels
        if value.get(("concat_raw", lv))
    )
    queries = table["n_queries"].max()
    return (
        f"mAP(L) against the teacher's ranking of each of {queries} held-out test queries (± standard error):\n\n"
        f"{evaluation.markdown_table(table)}\n\ndistilled / raw concatenation: {ratios}."
    )


def counterfactual_section(rows: pl.DataFrame) -> str:
    if rows.is_empty():
        return "Not measured yet: run `gda counterfactual` (it retrains the model once per query and cell)."
    hours = rows["train_seconds"].sum() / 3600
    return (
        f"Leave-k-out: {rows.height} retrains from scratch ({hours:.1f} h of retraining wall time), each without one "
        f"method's top k for one test query. ΔL = L(query, θ−k) − L(query, θ0) on fixed draws; higher means the "
        f"removed images mattered more (paper's expected order: random < raw features < distilled ≤ AbU+):\n\n"
        f"{counterfactual.markdown_table(counterfactual.summary(rows))}"
    )


def study_section(rows: pl.DataFrame) -> str:
    if rows.is_empty():
        return "Not measured yet: run `gda study` (it trains students from the stored teacher scores)."
    seeds = rows["seed"].n_unique()
    return (
        f"Each arm changes one choice of the profile's student (`defaults`); mAP(L) on the test queries, mean over "
        f"{seeds} student seeds ± the standard error over queries, with the seeds' half-spread:\n\n"
        f"{student_study.markdown_table(rows)}"
    )


def latency_section(latency: dict[str, Any] | None) -> str:
    if latency is None:
        return "Not measured yet: run `gda bench latency --json bench/results/latency.json`."
    return "\n".join(
        [
            "| per query (p50) | value |",
            "|---|---|",
            f"| (a) distilled, end to end | {latency['distilled']['p50_ms']:.1f} ms |",
            f"| (b) raw image features, end to end | {latency['raw_image']['p50_ms']:.1f} ms |",
            f"| (a) / (b) | {latency['ratio_distilled_over_raw']:.2f} |",
            f"| AbU+ finite / (a) | {latency['ratio_teacher_over_distilled']:.0f}x |",
            f"| AbU+ first order / (a) | {latency['ratio_first_order_teacher_over_distilled']:.0f}x |",
        ]
    )


def render(database: Path, latency_json: Path | None) -> str:
    """The whole report: mAP table, counterfactual table, student study, latency ratios."""
    latency = json.loads(latency_json.read_text()) if latency_json and latency_json.exists() else None
    measured_on = f" ({latency_json.name}, {latency['threads']} threads)" if latency else ""
    return "\n\n".join(
        [
            "### Attribution quality: mAP(L)",
            rank_section(_table(database, "eval_rank")),
            "### Counterfactual: what removing each method's top k costs the query",
            counterfactual_section(_table(database, "eval_counterfactual")),
            "### Student design study: what limits the distilled embedder",
            study_section(_table(database, "student_study")),
            f"### Latency{measured_on}",
            latency_section(latency),
        ]
    )


def embed(readme: str, report: str) -> str:
    """`readme` with the text between the report markers replaced by `report`."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), flags=re.DOTALL)
    if not pattern.search(readme):
        raise ValueError(f"the README has no report block; add the lines {BEGIN} and {END} where it belongs")
    return pattern.sub(lambda _: f"{BEGIN}\n{report}\n{END}", readme, count=1)

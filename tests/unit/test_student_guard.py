"""gda.student_guard: the warning when the distilled embedder ranks below its own input features."""

import polars as pl

from gda.student_guard import StudentGuard, shortfalls


def _table(rows: list[tuple[str, int, float]]) -> pl.DataFrame:
    return pl.DataFrame([{"method": m, "L": level, "map": v, "se": 0.01, "n_queries": 8} for m, level, v in rows])


def test_shortfalls_name_every_level_and_baseline_the_student_is_below() -> None:
    table = _table(
        [
            ("random", 10, 0.02),
            ("image", 10, 0.50),  # image alone is not guarded: the student is not asked to beat every part
            ("text", 10, 0.30),
            ("concat_raw", 10, 0.20),
            ("distilled", 10, 0.25),
            ("text", 30, 0.10),
            ("concat_raw", 30, 0.40),
            ("distilled", 30, 0.35),
        ]
    )
    short = shortfalls(table)
    assert short.select("L", "baseline", "distilled", "baseline_map").rows() == [
        (10, "text", 0.25, 0.30),
        (30, "concat_raw", 0.35, 0.40),
    ]
    guard = StudentGuard(short)
    assert not guard.passed
    message = guard.message()
    assert "L=10: 0.250 vs text 0.300" in message and "L=30: 0.350 vs concat_raw 0.400" in message
    assert "\n" not in message and "student_study_job" in message
    assert guard.markdown().count("\n") == 3  # header, rule, two rows


def test_a_student_at_or_above_its_inputs_passes() -> None:
    table = _table([("text", 10, 0.3), ("concat_raw", 10, 0.2), ("distilled", 10, 0.3)])
    guard = StudentGuard(shortfalls(table))
    assert guard.passed and guard.message() is None and "every L" in guard.markdown()

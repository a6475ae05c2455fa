"""DuckDB DDL (``schema.sql``) and named queries (``queries.sql``), read as package data."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources


def schema_sql() -> str:
    return resources.files(__package__).joinpath("schema.sql").read_text()


@cache
def named_queries() -> dict[str, str]:
    """Queries from ``queries.sql`` by the name on their ``-- name: NAME`` line."""
    text = resources.files(__package__).joinpath("queries.sql").read_text()
    parts = re.split(r"^-- name: *(\S+) *$", text, flags=re.MULTILINE)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2])}


def named_query(name: str) -> str:
    queries = named_queries()
    if name not in queries:
        raise KeyError(f"no query named {name!r} in sql/queries.sql; known: {', '.join(sorted(queries))}")
    return queries[name]

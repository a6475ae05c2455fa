"""Column lineage: which upstream columns each table's columns come from, as the UI's column lineage shows it.

One declaration per table, emitted as ``dagster/column_lineage`` with every materialization of the asset that
writes the table (and, for ``attribution_log``, written by the query service, on its spec). An auditor follows
a credited training image from an answer back to the ingested row it names.
"""

import dagster as dg

from gda import layout

# table -> column -> the (asset, column) pairs it is derived from
LINEAGE: dict[str, dict[str, list[tuple[str, str]]]] = {
    "dino_candidates": {
        "query_id": [(layout.GENERATED_QUERIES, "query_id")],
        "train_id": [(layout.TRAINING_IMAGES, "id")],
    },
    "abu_scores": {
        "query_id": [(layout.GENERATED_QUERIES, "query_id")],
        "train_id": [(layout.TRAINING_IMAGES, "id"), (layout.DINO_CANDIDATES, "train_id")],
    },
    "attribution_log": {
        "train_ids": [(layout.TRAINING_IMAGES, "id")],
        "model_version": [(layout.GENERATED_QUERIES, "model_version")],
    },
}


def column_lineage(table: str) -> dg.TableColumnLineage:
    return dg.TableColumnLineage(
        deps_by_column={
            column: [dg.TableColumnDep(asset_key=dg.AssetKey(asset), column_name=name) for asset, name in sources]
            for column, sources in LINEAGE[table].items()
        }
    )

"""Column lineage: which upstream columns each table's columns come from, as the UI's column lineage shows it.

One declaration per table, emitted as ``dagster/column_lineage`` with every materialization of the asset that
writes the table (and, for ``attribution_log``, written by the query service, on its spec). An auditor follows
a credited training image from an answer back to the ingested row it names.
"""

import dagster as dg

# table -> column -> the (asset, column) pairs it is derived from
LINEAGE: dict[str, dict[str, list[tuple[str, str]]]] = {
    "dino_candidates": {
        "query_id": [("generated_queries", "query_id")],
        "train_id": [("training_images", "id")],
    },
    "abu_scores": {
        "query_id": [("generated_queries", "query_id")],
        "train_id": [("training_images", "id"), ("dino_candidates", "train_id")],
    },
    "attribution_log": {
        "train_ids": [("training_images", "id")],
        "model_version": [("generated_queries", "model_version")],
    },
}


def column_lineage(table: str) -> dg.TableColumnLineage:
    return dg.TableColumnLineage(
        deps_by_column={
            column: [dg.TableColumnDep(asset_key=dg.AssetKey(asset), column_name=name) for asset, name in sources]
            for column, sources in LINEAGE[table].items()
        }
    )

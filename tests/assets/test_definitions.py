"""The code location loads, validates, and every partitioned DuckDB asset says how it is partitioned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from gda.home import Home
from gda_assets.factory import build_defs
from gda_assets.partitions import shard_partitions


def _assets(defs: dg.Definitions) -> dict[str, dg.AssetSpec]:
    graph = defs.resolve_asset_graph()
    return {key.to_user_string(): graph.get(key) for key in graph.get_all_asset_keys()}


def test_definitions_validate(tmp_path: Path) -> None:
    defs = build_defs(home=Home(tmp_path), profile="tiny")
    dg.Definitions.validate_loadable(defs)
    groups = {name: node.group_name for name, node in _assets(defs).items()}
    assert groups == {
        "demo_corpus": "corpus",
        "training_images": "corpus",
        "rejected_images": "corpus",
        "image_features": "features",
        "text_features": "features",
        "diffusion_model": "model",
        "query_prompts": "model",
        "generated_queries": "model",
        "query_image_features": "model",
        "query_text_features": "model",
        "dino_candidates": "teacher",
        "ekfac_factors": "teacher",
        "training_gradients": "teacher",
        "baseline_losses": "teacher",
        "abu_scores": "teacher",
        "attribution_embedder": "student",
        "training_embeddings": "student",
        "attribution_index": "student",
        "rank_eval": "evaluation",
        "counterfactual_eval": "evaluation",
        "student_study": "evaluation",
        "attribution_log": "serving",
    }


def test_only_a_new_shards_partitions_and_the_index_are_automated(tmp_path: Path) -> None:
    """A shard arriving must not retrain the model or rescore queries: only per-shard assets and the index
    carry an automation condition, every asset has a code version, and the sensors run on a fresh instance."""
    defs = build_defs(home=Home(tmp_path), profile="tiny")
    assets = _assets(defs)
    automated = {name for name, node in assets.items() if node.automation_condition is not None}
    per_shard = {name for name, node in assets.items() if node.partitions_def == shard_partitions}
    assert automated == per_shard | {"attribution_index"}
    assert per_shard == {
        "training_images",
        "rejected_images",
        "image_features",
        "text_features",
        "training_gradients",
        "baseline_losses",
        "training_embeddings",
    }
    assert all(node.code_version for node in assets.values() if node.is_materializable)
    for name in ("shard_sensor", "automation"):
        assert defs.resolve_sensor_def(name).default_status == dg.DefaultSensorStatus.RUNNING


def test_every_asset_is_described_owned_and_kinded(tmp_path: Path) -> None:
    defs = build_defs(home=Home(tmp_path), profile="tiny", owner="team:audit")
    for name, node in _assets(defs).items():
        assert node.owners == ["team:audit"], name
        assert node.description and node.kinds, name
    log = _assets(defs)["attribution_log"]
    assert not log.is_materializable  # the query service writes it
    lineage = log.metadata["dagster/column_lineage"].deps_by_column["train_ids"]
    assert [(d.asset_key.to_user_string(), d.column_name) for d in lineage] == [("training_images", "id")]


def test_user_shards_leave_the_embedded_corpus_out(tmp_path: Path) -> None:
    defs = build_defs(home=Home(tmp_path), profile="tiny", shards=tmp_path / "mine")
    names = set(_assets(defs))
    assert "demo_corpus" not in names and "training_images" in names
    assert defs.resources["corpus"].shards_dir == str(tmp_path / "mine")


def test_every_partitioned_duckdb_asset_has_partition_expr(tmp_path: Path) -> None:
    defs = build_defs(home=Home(tmp_path), profile="tiny")
    graph = defs.resolve_asset_graph()
    duckdb_assets = []
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assets_def = graph.assets_def_for_key(key)
        io_key = assets_def.get_io_manager_key_for_asset_key(key)
        if io_key in ("warehouse_io", "batch_tables_io") and node.partitions_def is not None:
            duckdb_assets.append(key.to_user_string())
            assert node.metadata.get("partition_expr") in ("shard", "batch"), key
            assert "dagster/column_schema" in node.metadata, key
    assert sorted(duckdb_assets) == [
        "abu_scores",
        "dino_candidates",
        "generated_queries",
        "rejected_images",
        "training_images",
    ]


def test_blocking_checks_cover_every_table(tmp_path: Path) -> None:
    defs = build_defs(home=Home(tmp_path), profile="tiny")
    graph = defs.resolve_asset_graph()
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert ("training_images", "conforms_to_schema") in checks
    assert ("rejected_images", "conforms_to_schema") in checks
    assert ("training_images", "unique_ids") in checks
    assert ("generated_queries", "every_prompt_generated") in checks
    assert ("query_prompts", "conforms_to_schema") in checks
    # Every check of stored rows blocks; the two that measure the teacher against itself, the student's
    # guard, and the corpus warnings (a copied image, a parquet that disagrees with its tar), only warn.
    measuring = {
        ("abu_scores", "modes_agree"),
        ("abu_scores", "reseeded_agree"),
        ("rank_eval", "distilled_above_its_inputs"),
        ("training_images", "no_duplicate_images"),
        ("training_images", "agrees_with_parquet"),
    }
    assert measuring <= checks
    for key in graph.asset_check_keys:
        blocking = graph.get_check_spec(key).blocking
        assert blocking != ((key.asset_key.to_user_string(), key.name) in measuring), key


def test_dagster_cli_validates_the_code_location(tmp_path: Path) -> None:
    dagster = Path(sys.executable).with_name("dagster")
    env = {**os.environ, "GDA_HOME": str(tmp_path), "DAGSTER_HOME": str(Home(tmp_path).ensure().dagster_home)}
    done = subprocess.run(
        [str(dagster), "definitions", "validate", "-m", "gda_assets.definitions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Validation successful for code location" in done.stdout + done.stderr


# The model libraries cost seconds to import; every Dagster process (code server, run, step) loads the
# definitions, so loading them must not pull these in. Asset bodies import them when they run.
HEAVY_MODULES = ("torch", "diffusers", "transformers", "faiss")


def test_loading_the_definitions_imports_no_model_library(tmp_path: Path) -> None:
    probe = (
        "import sys; from gda_assets.definitions import defs; "
        f"print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "GDA_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"loading the definitions imported {done.stdout.strip()}"


def test_dg_checks_and_lists_the_definitions(tmp_path: Path) -> None:
    dg_cli = Path(sys.executable).with_name("dg")
    env = {**os.environ, "GDA_HOME": str(tmp_path)}
    root = Path(__file__).resolve().parents[2]
    checked = subprocess.run(
        [str(dg_cli), "check", "defs"], cwd=root, env=env, capture_output=True, text=True, timeout=180
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    listed = subprocess.run(
        [str(dg_cli), "list", "defs", "--json"], cwd=root, env=env, capture_output=True, text=True, timeout=180
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    listed_keys = {asset["asset_key"] for asset in json.loads(listed.stdout)["assets"]}
    assert listed_keys == set(_assets(build_defs(home=Home(tmp_path)))), listed_keys

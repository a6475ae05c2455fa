"""A user's corpus with a local Stable Diffusion folder: the model is registered, not trained, and
queries are generated in latent space and recorded exactly."""

from __future__ import annotations

from pathlib import Path

import duckdb
from sdkit import write_tiny_stable_diffusion
from shardkit import good, write_tar

from gda.home import Home
from gda.model_card import read_card
from gda.profiles import profile_values
from gda.queries import load_generated
from gda_assets.factory import build_defs
from gda_assets.runner import open_instance, run_shards
from resources import DiffusionSource, QueryPlan


def test_stable_diffusion_folder_is_registered_and_generates_latent_queries(tmp_path: Path) -> None:
    sd = tmp_path / "sd"
    write_tiny_stable_diffusion(sd)
    shards = tmp_path / "laion"
    members = [m for i in range(6) for m in good(f"00000{i:04d}", f"a red thing number {i}")]
    write_tar(shards / "00000.tar", members)
    home = Home(tmp_path / "home")
    sampling = profile_values("tiny")["diffusion"]["sampling"]
    overrides = {
        "diffusion": DiffusionSource(kind="pretrained", pretrained_path=str(sd), sampling=sampling),
        "query_plan": QueryPlan(n_train=2, n_val=1, n_test=1, batch_size=2),
    }
    defs = build_defs(home=home, profile="tiny", shards=shards, overrides=overrides)
    instance = open_instance(home)
    assert run_shards(instance, defs, "shard_job", ["00000"])[0].succeeded
    assert defs.resolve_job_def("model_job").execute_in_process(instance=instance).success

    card = read_card(home.artifacts / "diffusion_model")
    assert card.kind == "pretrained" and Path(card.weights) == sd.resolve() and card.loss_curve == []
    assert not (home.artifacts / "diffusion_model" / "weights").exists()  # registered in place, not copied

    batches = sorted(instance.get_dynamic_partitions("query_batches"))
    assert batches == ["test-000", "train-000", "val-000"]
    job = defs.resolve_job_def("query_batch_job")
    for batch in batches:
        assert job.execute_in_process(instance=instance, partition_key=batch).success
    generated = load_generated(home.artifacts / "generated_queries" / "train-000.safetensors")
    assert generated.samples.shape == (2, 4, 8, 8)  # latents, exactly as denoised
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        rows = con.execute("SELECT model_version, fg_expected FROM generated_queries").fetchall()
    assert len(rows) == 4 and {r[0] for r in rows} == {card.version} and {r[1] for r in rows} == {None}

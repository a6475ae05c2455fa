"""The ``sd`` profile end to end on CPU: tiny random Stable Diffusion, DINO ViT and CLIP text checkpoints in
exactly the folder layouts of the real ones, named by the profile's environment variables, and LAION-style
shards. Only sizes (and the device) are overridden; everything else is the profile's own: hf encoders,
the registered pretrained model with VAE latents, the finite AbU+ teacher, Parquet score tables."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from hfkit import save_clip_text_model, save_image_model
from PIL import Image
from sdkit import write_tiny_stable_diffusion
from shardkit import png, write_tar

from gda import arrays
from gda.home import Home
from gda.model_card import LATENT_ENCODING, read_card
from gda.profiles import ProfileSettingError, profile_values
from gda.queries import load_generated
from gda.service import open_engine
from gda_assets.factory import build_defs
from gda_assets.runner import demo
from resources import Compute, DiffusionSource, EvaluationSettings, QueryPlan, StudentSettings, TeacherSettings

COLOURS = {"red": (200, 30, 30), "blue": (30, 40, 200), "green": (30, 170, 60)}
PER_SHARD = 12


def laion_shard(path: Path, shard: int) -> None:
    members = []
    for i in range(PER_SHARD):
        name, colour = list(COLOURS.items())[(i + shard) % len(COLOURS)]
        key = f"{shard:05d}{i:04d}"
        shade = tuple(min(255, c + 5 * i) for c in colour)
        members += [(f"{key}.jpg", png((24, 24), shade)), (f"{key}.txt", f"a {name} thing number {i}".encode())]
    write_tar(path / f"{shard:05d}.tar", members)


@pytest.fixture
def sd_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    folders = {
        "GDA_SD_MODEL": tmp_path / "stable-diffusion-v1-4",
        "GDA_DINO_MODEL": tmp_path / "dino-vitb16",
        "GDA_CLIP_TEXT_MODEL": tmp_path / "clip-vit-base-patch32",
    }
    write_tiny_stable_diffusion(folders["GDA_SD_MODEL"])
    save_image_model(folders["GDA_DINO_MODEL"], "vit")
    save_clip_text_model(folders["GDA_CLIP_TEXT_MODEL"])
    for name, folder in folders.items():
        monkeypatch.setenv(name, str(folder))
    return folders


def test_sd_profile_without_its_model_paths_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("GDA_SD_MODEL", "GDA_DINO_MODEL", "GDA_CLIP_TEXT_MODEL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ProfileSettingError, match="needs GDA_DINO_MODEL: set it to a DINO ViT-B/16") as error:
        build_defs(home=Home(tmp_path / "home"), profile="sd", shards=tmp_path)
    assert "\n" not in str(error.value)


def test_sd_profile_runs_the_whole_chain_on_tiny_components(tmp_path: Path, sd_models: dict[str, Path]) -> None:
    shards = tmp_path / "laion"
    for shard in range(2):
        laion_shard(shards, shard)
    home = Home(tmp_path / "home")
    values = profile_values("sd")
    assert values["diffusion"]["pretrained_path"] == str(sd_models["GDA_SD_MODEL"])
    # Sizes only: the profile's models, modes, precision and table format stay as they are.
    overrides = {
        "compute": Compute(**{**values["compute"], "device": "cpu", "threads": 1}),
        "diffusion": DiffusionSource(**{**values["diffusion"], "sampling": {"steps": 2, "guidance_scale": 2.0}}),
        "query_plan": QueryPlan(**{**values["query_plan"], "n_train": 4, "n_val": 2, "n_test": 2, "batch_size": 4}),
        "teacher": TeacherSettings(
            **{
                **values["teacher"],
                "k_candidates": 6,
                "n_negatives": 3,
                "scoring_timesteps": 2,
                "query_draws": 2,
                "batch_size": 8,
                "agreement_candidates": 4,
            }
        ),
        "student": StudentSettings(
            **{**values["student"], "widths": [16, 8], "top_k": 6, "batch_size": 32, "epochs": 2}
        ),
        "evaluation": EvaluationSettings(**{**values["evaluation"], "counterfactual_k": [2], "gallery_queries": 1}),
    }
    report = demo(home, profile="sd", shards_dir=shards, overrides=overrides)
    assert all(report.query_batches.values()) and all(report.scored_batches.values())

    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM training_images").fetchone() == (2 * PER_SHARD,)
        kinds = dict(con.execute("SELECT table_name, table_type FROM information_schema.tables").fetchall())
        scores = con.execute("SELECT query_id, train_id, mode, model_version FROM abu_scores").pl()
    # The score and candidate tables are views over one Parquet file per query batch.
    assert kinds["abu_scores"] == kinds["dino_candidates"] == "VIEW"
    files = sorted((home.artifacts / "tables" / "abu_scores").glob("batch=*.parquet"))
    assert [f.name for f in files] == ["batch=test-000.parquet", "batch=train-000.parquet", "batch=val-000.parquet"]
    on_disk = pl.concat([pl.read_parquet(f) for f in files])
    assert on_disk.height == scores.height == (4 + 2 + 2) * 6  # every query scores its 6 DINO candidates
    assert set(scores["mode"]) == {"finite"}

    # The registered model: the user's folder in place, with the latent encoding recorded.
    card = read_card(home.artifacts / "diffusion_model")
    assert card.kind == "pretrained" and Path(card.weights) == sd_models["GDA_SD_MODEL"].resolve()
    assert card.model_config["latents"] == LATENT_ENCODING
    assert set(scores["model_version"]) == {card.version}
    generated = load_generated(home.artifacts / "generated_queries" / "train-000.safetensors")
    assert generated.samples.shape == (4, 4, 8, 8) and np.isfinite(generated.samples.numpy()).all()

    # DINO (hidden 32) and CLIP text (projection 20) features from the hf checkpoints.
    image = arrays.load(home.artifacts / "image_features" / "00000.safetensors")
    text = arrays.load(home.artifacts / "text_features" / "00000.safetensors")
    assert image.values.shape == (PER_SHARD, 32) and text.values.shape == (PER_SHARD, 20)

    # The query service answers from the distilled index with training images of the corpus.
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        path, prompt = con.execute(
            "SELECT image_path, prompt FROM generated_queries ORDER BY query_id LIMIT 1"
        ).fetchone()
        ids = {row[0] for row in con.execute("SELECT id FROM training_images").fetchall()}
    with open_engine(home, "sd", shards=shards) as engine:
        answer = engine.attribute(Image.open(home.artifacts / path), prompt, 5)
    assert len(answer.results) == 5 and {m.train_id for m in answer.results} <= ids

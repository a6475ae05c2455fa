"""Profiles: named sets of resource configuration values, chosen by ``--profile`` / ``GDA_PROFILE``.

A profile holds no logic: for each resource (by its name in the Dagster ``Definitions``) the config values
to construct it with. ``tiny`` runs in seconds and is what the tests use; ``demo`` is the laptop default;
``sd`` is Stable Diffusion v1.x on a user's LAION shards, on GPUs.

A value ``"$NAME"`` is read from the environment variable NAME when the profile is used: the ``sd`` profile's
model folders are the user's own local paths (``SD_PATHS``), and nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# The demo's trained model ships with gda (made by `gda demo --retrain`; see its model_card.json), so the
# demo does not spend its first quarter hour training. It is used only when its corpus fingerprint
# matches the ingested corpus.
DEMO_CHECKPOINT = Path(__file__).parent / "checkpoints" / "demo"

DEFAULT_PROFILE = "demo"

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "demo_corpus_source": {"n_images": 240, "n_shards": 2, "resolution": 16, "seed": 0, "n_heldout_prompts": 64},
        "encoders": {"image_size": 64, "batch_size": 64, "text_quantization": "int8"},
        # One thread: tiny tensors gain nothing from two, and OpenMP threads that spin-wait for a core
        # another process holds made a tiny run 30x slower on a busy 2-core machine.
        "compute": {"device": "cpu", "threads": 1},
        "diffusion": {
            "model": {"block_channels": [16, 32], "attention_heads": 2, "norm_num_groups": 4, "text_max_length": 16},
            "training": {"steps": 30, "batch_size": 32, "lr": 2e-3},
            "sampling": {"steps": 10, "guidance_scale": 3.0},
        },
        "query_plan": {"n_train": 16, "n_val": 4, "n_test": 8, "batch_size": 8},
        # The tiny model's K/V weights are so small that a 1e-3 step moves losses by about 1e-8, the float32
        # rounding floor of the finite teacher (Spearman vs first order 0.53 there, 0.97 at 1e-2). The demo's 10
        # scoring timesteps: the training-side pass is the tiny chain's costliest step, and CI runs it often.
        "teacher": {"k_candidates": 60, "n_negatives": 20, "relative_step": 1e-2, "scoring_timesteps": 10},
        "student": {"widths": [32, 32, 16], "top_k": 60, "batch_size": 256, "epochs": 3},
        # Two test queries in one group: four cells (one per method), each retraining twice.
        "evaluation": {
            "counterfactual_k": [5],
            "counterfactual_queries": 2,
            "counterfactual_group_size": 2,
            "loss_draws": 32,
        },
    },
    "demo": {
        "demo_corpus_source": {"n_images": 3000, "n_shards": 6, "resolution": 16, "seed": 0, "n_heldout_prompts": 600},
        # int8 text weights: one prompt in 1.9 ms instead of 5.7 on a core (gda.encoders.runtime).
        "encoders": {"image_size": 128, "batch_size": 64, "text_quantization": "int8"},
        "compute": {"device": "cpu", "threads": 2},
        # The recipe that made generated icons follow their prompts' colours (fg 0.96, bg 0.87 on 300
        # held-out prompts; see the model card): v-prediction with zero terminal SNR makes the model read
        # the background, which is decided at the highest noise, from the prompt; guidance rescale keeps
        # guided samples from washing it out; 10 DDIM steps beat 25 and 50.
        "diffusion": {
            "shipped_checkpoint": str(DEMO_CHECKPOINT),
            "model": {
                "prediction_type": "v_prediction",
                "rescale_betas_zero_snr": True,
                "timestep_spacing": "trailing",
            },
            "training": {"steps": 1200, "batch_size": 64, "lr": 1e-3},
            "sampling": {"steps": 10, "guidance_scale": 2.0, "guidance_rescale": 0.7},
        },
        "query_plan": {"n_train": 240, "n_val": 40, "n_test": 40, "batch_size": 40},
        # 10 scoring draws (t = 0, 100, ..., 900) rather than the paper's 20 halve the one-off training-side
        # pass over the corpus, the slowest teacher step on a laptop; 48 query draws and 50 candidates for
        # the agreement checks keep the whole demo within 15 minutes on 2 cores.
        "teacher": {
            "k_candidates": 300,
            "n_negatives": 100,
            "scoring_timesteps": 10,
            "query_draws": 48,
            "agreement_candidates": 50,
        },
        # One hidden layer: the student study on this home (240 train queries, 2 seeds) put width-shallow
        # (512-256) at mAP(30) 0.225 against 0.186 for the earlier 512-512-512-256, and deep at 0.082; with
        # few queries, depth overfits (README, student design study).
        "student": {"widths": [512, 256], "epochs": 10},
        # 4 queries x 4 methods x one k = 16 retrains of about 8.5 minutes each on 2 cores. k = 100 is 3.3% of
        # the corpus, the paper's larger k (4,000 of 118k).
        "evaluation": {"counterfactual_k": [100], "counterfactual_queries": 4, "counterfactual_group_size": 1},
    },
    # Stable Diffusion v1.x on a user's LAION shards (--shards), with the paper's sizes (method.md; paper
    # §5: 100k candidates per query and 101M teacher pairs, so about 1,000 training queries).
    "sd": {
        "demo_corpus_source": {"n_images": 3000, "n_shards": 6, "resolution": 64, "seed": 0, "n_heldout_prompts": 600},
        "encoders": {
            "image_backend": "hf",
            "image_model": "$GDA_DINO_MODEL",
            "text_backend": "hf",
            "text_model": "$GDA_CLIP_TEXT_MODEL",
            "batch_size": 256,
        },
        # Half precision where only a forward pass is taken (frozen encoders, sampling queries); the loss,
        # its gradients and the EK-FAC factors stay float32, their eigendecompositions float64.
        "compute": {"device": "cuda", "dtype": "float16"},
        "diffusion": {
            "kind": "pretrained",
            "pretrained_path": "$GDA_SD_MODEL",
            "sampling": {"steps": 50, "guidance_scale": 7.5},
        },
        # One query batch is one GPU step: 10 queries x 100k candidates x 2 x 20 draws is ~4e7 UNet rows.
        "query_plan": {"n_train": 1010, "n_val": 50, "n_test": 100, "batch_size": 10},
        # AbU+ as the paper ran it: the finite step on each query's 100k DINO candidates.
        "teacher": {
            "k_candidates": 100_000,
            "n_negatives": 10_000,
            "mode": "finite",
            "full_ranking_splits": [],
            "scoring_timesteps": 20,
            "query_draws": 64,
            "batch_size": 64,
        },
        "student": {"widths": [768, 768, 768, 768], "top_k": 100_000, "batch_size": 4096, "epochs": 10},
        # IVF-PQ from 20M images; 65,536 lists is about 3 sqrt(n) at 413M. At 10M x 768 (widened synthetic
        # vectors, bench/results/index-scale.json) the probing bounds recall@10, not the refine stage: 0.783 at
        # nprobe 32, 0.906 at 64; measure on the real embeddings before raising it.
        "index": {"ivf_above": 200_000, "pq_above": 20_000_000, "nlist": 65_536, "nprobe": 32, "pq_bytes": 64},
        # Many GPU workers score query batches at once: their tables are Parquet files, not one DuckDB writer.
        "warehouse": {"table_format": "parquet"},
        "evaluation": {"counterfactual_k": [4000], "counterfactual_queries": 4, "counterfactual_group_size": 1},
    },
}


# The demo with 2,000 training queries (8x; the paper: "a few thousand queries suffice"), for
# the student study's query axis. The corpus and its shards are the demo's (only more held-out prompts are
# drawn, after the images), so the shipped checkpoint still applies.
PROFILES["demo-large"] = {
    **PROFILES["demo"],
    "demo_corpus_source": {**PROFILES["demo"]["demo_corpus_source"], "n_heldout_prompts": 2200},
    "query_plan": {**PROFILES["demo"]["query_plan"], "n_train": 2000},
}

# What the sd profile needs from the user, each a local folder (or a hub id already in the HF cache for the
# encoders), named by environment variable.
SD_PATHS = {
    "GDA_SD_MODEL": "a Stable Diffusion v1.x diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)",
    "GDA_DINO_MODEL": "a DINO ViT-B/16 image model in Hugging Face layout (e.g. facebook/dino-vitb16)",
    "GDA_CLIP_TEXT_MODEL": "a CLIP ViT-B/32 text model in Hugging Face layout (e.g. openai/clip-vit-base-patch32)",
}


class UnknownProfileError(ValueError):
    pass


class ProfileSettingError(ValueError):
    """A profile names an environment variable that is not set."""


def resolve_profile(name: str | None = None) -> str:
    chosen = name or os.environ.get("GDA_PROFILE") or DEFAULT_PROFILE
    if chosen not in PROFILES:
        raise UnknownProfileError(f"unknown profile {chosen!r}; choose one of: {', '.join(PROFILES)}")
    return chosen


def _filled(value: Any, profile: str) -> Any:
    if isinstance(value, dict):
        return {key: _filled(item, profile) for key, item in value.items()}
    if isinstance(value, str) and value.startswith("$"):
        name = value[1:]
        if not os.environ.get(name):
            what = SD_PATHS.get(name, "a value")
            raise ProfileSettingError(f"profile {profile!r} needs {name}: set it to {what}")
        return os.environ[name]
    return value


def profile_values(name: str | None) -> dict[str, dict[str, Any]]:
    chosen = resolve_profile(name)
    return _filled(PROFILES[chosen], chosen)

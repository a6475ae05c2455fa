"""A home's asset names and artifact files, defined once.

Every asset is named here; `gda_assets` declares its assets under these names, and the artifact root
holds one folder per asset that writes files: ``ROOT/ASSET/`` for a folder (model, factors, embedder,
index), ``ROOT/ASSET/PARTITION.safetensors`` for one array file per partition.
"""

from __future__ import annotations

from pathlib import Path

DEMO_CORPUS = "demo_corpus"
TRAINING_IMAGES = "training_images"
REJECTED_IMAGES = "rejected_images"
IMAGE_FEATURES = "image_features"
TEXT_FEATURES = "text_features"
DIFFUSION_MODEL = "diffusion_model"
QUERY_PROMPTS = "query_prompts"
GENERATED_QUERIES = "generated_queries"
QUERY_IMAGE_FEATURES = "query_image_features"
QUERY_TEXT_FEATURES = "query_text_features"
DINO_CANDIDATES = "dino_candidates"
EKFAC_FACTORS = "ekfac_factors"
TRAINING_GRADIENTS = "training_gradients"
BASELINE_LOSSES = "baseline_losses"
ABU_SCORES = "abu_scores"
ATTRIBUTION_EMBEDDER = "attribution_embedder"
TRAINING_EMBEDDINGS = "training_embeddings"
ATTRIBUTION_INDEX = "attribution_index"
RANK_EVAL = "rank_eval"
COUNTERFACTUAL_EVAL = "counterfactual_eval"
STUDENT_STUDY = "student_study"
ATTRIBUTION_LOG = "attribution_log"

ARRAY_SUFFIX = ".safetensors"


def partition_file(root: Path, asset: str, partition: str | None = None) -> Path:
    """The file of one partition of ``asset`` (``all`` for an unpartitioned one)."""
    return Path(root) / asset / f"{partition or 'all'}{ARRAY_SUFFIX}"


def stored_partitions(root: Path, asset: str) -> list[str]:
    """The partition keys of ``asset`` that have a file, sorted."""
    return sorted(path.name.removesuffix(ARRAY_SUFFIX) for path in (Path(root) / asset).glob(f"*{ARRAY_SUFFIX}"))

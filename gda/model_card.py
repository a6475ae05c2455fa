"""The model card: what a trained or registered diffusion model is, and how it was made.

Every materialization of the model writes ``model_card.json`` next to (or pointing at) the weights. The
card records the training recipe, including the loss weighting the teacher must reuse, the corpus it
was trained on (a fingerprint of ids, image hashes and captions), and a version hash of the weights,
which downstream assets record with everything they compute from the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gda.paths import inside, model_folder

CARD = "model_card.json"
# How gda.diffusion.loss.encode_images turns training images into what a latent UNet denoises; recorded in
# a registered model's card, because scores made with sampled latents would not be comparable.
LATENT_ENCODING = "VAE posterior mean x scaling_factor (deterministic; no sampling)"


@dataclass(frozen=True)
class ModelCard:
    kind: str  # "scratch" (trained here) or "pretrained" (a local Stable Diffusion folder)
    weights: str  # folder loadable by gda.diffusion.load / load_pretrained; relative to the card for scratch
    version: str  # hash over the weight files
    corpus_fingerprint: str | None = None  # scratch: the training set it was trained on
    n_training_images: int | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # steps, lr, seed, cfg_dropout, snr_gamma, ...
    loss_curve: list[float] = field(default_factory=list)
    train_seconds: float | None = None
    parameters: int | None = None
    command: str | None = None  # how to reproduce it
    shipped: bool = False  # copied from the checkpoint that ships with gda rather than trained in this run

    @property
    def snr_gamma(self) -> float | None:
        value = self.training.get("snr_gamma")
        return None if value is None else float(value)


def weights_version(folder: Path) -> str:
    """A short hash of every safetensors and JSON config file under ``folder`` (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".json") and p.name != CARD):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def corpus_fingerprint(ids: list[int], sha256s: list[str], captions: list[list[str]]) -> str:
    digest = hashlib.sha256()
    for row in sorted(zip(ids, sha256s, captions)):
        digest.update(json.dumps([row[0], row[1], list(row[2])]).encode())
    return digest.hexdigest()[:16]


def write_card(folder: Path, card: ModelCard) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CARD
    tmp = path.with_name(f".{CARD}.tmp")
    tmp.write_text(json.dumps(asdict(card), indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_card(folder: Path) -> ModelCard:
    path = folder / CARD
    if not path.exists():
        raise FileNotFoundError(f"no {CARD} in {folder}: materialize diffusion_model first")
    return ModelCard(**json.loads(path.read_text()))


def weights_dir(folder: Path, card: ModelCard) -> Path:
    """The folder the card's weights are in: a pretrained model's is the folder it was registered from; a
    model trained here keeps its weights inside the card's folder, and a card naming another is refused."""
    if card.kind == "pretrained":
        return model_folder(card.weights, "pretrained model")
    return model_folder(inside(folder, card.weights, "model card weights"), "model weights")

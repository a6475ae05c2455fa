"""The home's registered diffusion model: its card and its weights, loaded for work."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gda.model_card import ModelCard, read_card, weights_dir

if TYPE_CHECKING:
    from gda.diffusion.bundle import DiffusionBundle


def open_model(folder: Path, device: str) -> tuple[DiffusionBundle, ModelCard]:
    """The model published in ``folder`` (``diffusion_model``'s) on ``device``, with its card."""
    from gda.diffusion.bundle import load, load_pretrained

    card = read_card(folder)
    loader = load if card.kind == "scratch" else load_pretrained
    bundle = loader(weights_dir(folder, card)).to(device)
    bundle.snr_gamma = card.snr_gamma
    return bundle, card

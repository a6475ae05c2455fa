"""Where the home's diffusion model comes from: a local Stable Diffusion folder registered in place, the shipped
checkpoint when it was trained on exactly this corpus, or a model trained here from scratch; and what
``diffusion_model`` shows of the model it registered (samples for training captions, the loss curve)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import polars as pl

from gda import plots
from gda.diffusion import (
    DiffusionBundle,
    ScratchModelConfig,
    build_from_scratch,
    load,
    load_pretrained,
    sample,
    save,
    train,
)
from gda.diffusion.data import load_corpus_images
from gda.model_card import (
    CARD,
    LATENT_ENCODING,
    ModelCard,
    corpus_fingerprint,
    read_card,
    weights_dir,
    weights_version,
    write_card,
)
from gda.store import Store

PREVIEW_PROMPTS = 16


@dataclass(frozen=True)
class TrainingRecipe:
    """How a scratch model is trained (``gda.diffusion.train``'s arguments); the card records it as is."""

    steps: int
    batch_size: int
    lr: float
    seed: int
    cfg_dropout: float
    snr_gamma: float | None


@dataclass(frozen=True)
class SamplingConfig:
    """``gda.diffusion.sample``'s keyword arguments, passed as ``**asdict(...)`` so none is left behind."""

    steps: int
    guidance_scale: float
    guidance_rescale: float


@dataclass(frozen=True)
class ModelSource:
    """Every diffusion setting (``resources.DiffusionSource`` documents and checks each; its ``config()``
    makes this)."""

    kind: str  # "scratch" | "pretrained"
    pretrained_path: Path | None
    shipped_checkpoint: Path | None
    retrain: bool
    model: ScratchModelConfig
    training: TrainingRecipe
    sampling: SamplingConfig


@dataclass(frozen=True)
class RegisteredModel:
    card: ModelCard
    bundle: DiffusionBundle  # on the CPU
    corpus_fingerprint: str  # of the training rows it was registered for (a pretrained card does not record it)


def register_model(
    source: ModelSource, store: Store, rows: pl.DataFrame, folder: Path, log: Callable[[str], None]
) -> RegisteredModel:
    """The model of ``source`` for the training ``rows`` (``corpus_for_training``), with its card written into
    ``folder`` (a fresh version folder): a pretrained folder is registered where it is; a scratch model is the
    shipped checkpoint when that was trained on exactly these rows and ``source.retrain`` is off, else it is
    trained here and saved in ``folder``."""
    fingerprint = corpus_fingerprint(rows["id"].to_list(), rows["sha256"].to_list(), rows["captions"].to_list())
    if source.kind == "pretrained":
        # DiffusionSource refuses a pretrained kind without an existing folder, and resolves the path.
        path = Path(source.pretrained_path)
        card = ModelCard(
            kind="pretrained",
            weights=str(path),
            version=weights_version(path),
            command="registered",
            model_config={"latents": LATENT_ENCODING},
        )
        bundle = load_pretrained(path)
    else:
        shipped = source.shipped_checkpoint
        shipped_card = read_card(shipped) if shipped and (shipped / CARD).exists() else None
        if not source.retrain and shipped_card and shipped_card.corpus_fingerprint == fingerprint:
            log(f"using the shipped checkpoint {shipped} (trained on this exact corpus)")
            shutil.copytree(shipped, folder, dirs_exist_ok=True)
            card = replace(shipped_card, shipped=True)
        else:
            card = _train_scratch(source, store, rows, folder, log)
        card = replace(card, corpus_fingerprint=fingerprint)
        bundle = load(weights_dir(folder, card))
    write_card(folder, card)
    return RegisteredModel(card, bundle, fingerprint)


def _train_scratch(
    source: ModelSource, store: Store, rows: pl.DataFrame, folder: Path, log: Callable[[str], None]
) -> ModelCard:
    images = load_corpus_images(rows, store.shard_path, source.model.sample_size)
    log(f"training from scratch on {len(images)} images for {source.training.steps} steps")
    bundle = build_from_scratch(source.model)
    training = asdict(source.training)
    result = train(bundle, images, rows["captions"].to_list(), progress=True, **training)
    save(bundle, folder / "weights")
    return ModelCard(
        kind="scratch",
        weights="weights",
        version=weights_version(folder / "weights"),
        n_training_images=len(images),
        model_config=asdict(source.model),
        training=training,
        loss_curve=result.loss_curve,
        train_seconds=result.seconds,
        parameters=sum(p.numel() for p in bundle.unet.parameters()),
        command="gda demo --retrain",
    )


@dataclass(frozen=True)
class ModelSummary:
    parameters: int  # of the UNet
    samples_png: bytes  # samples for a spread of training captions
    loss_curve_png: bytes | None  # the training loss of a model trained here (or shipped); None for pretrained


def model_summary(
    bundle: DiffusionBundle, card: ModelCard, rows: pl.DataFrame, sampling: SamplingConfig, device: str
) -> ModelSummary:
    """Samples of the model on ``device`` for up to ``PREVIEW_PROMPTS`` first captions spread over ``rows``
    (seeds 0, 1, ...), and its loss curve when the card has one."""
    bundle = bundle.to(device)
    preview = (
        rows["captions"]
        .list.first()
        .gather_every(max(1, rows.height // PREVIEW_PROMPTS))
        .head(PREVIEW_PROMPTS)
        .to_list()
    )
    result = sample(bundle, preview, list(range(len(preview))), **asdict(sampling))
    grid = plots.image_grid_png(
        result.images.permute(0, 2, 3, 1).cpu().numpy(), preview, title="samples for training captions"
    )
    curve = (
        plots.line_plot_png({"train loss": card.loss_curve}, "training loss", "logged interval", "loss", log_y=True)
        if card.loss_curve
        else None
    )
    return ModelSummary(sum(p.numel() for p in bundle.unet.parameters()), grid, curve)

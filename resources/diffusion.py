"""The text-to-image model: where it comes from (trained from scratch here, or a local Stable Diffusion
folder), how it is trained, and how queries are sampled from it."""

from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field, field_validator, model_validator

from gda.paths import model_folder, resolved

if TYPE_CHECKING:  # gda.model_source imports torch and diffusers, which loading the definitions must not
    from gda.model_source import ModelSource


class ScratchModelSettings(dg.Config):
    """Architecture of the model trained from scratch (see gda.diffusion.ScratchModelConfig)."""

    sample_size: int = 16
    block_channels: list[int] = [32, 64]
    attention_levels: list[bool] = [False, True]
    attention_heads: int = 4
    norm_num_groups: int = 8
    prediction_type: str = "epsilon"
    beta_schedule: str = "linear"
    text_max_length: int = 32
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (needs v_prediction)
    timestep_spacing: str = "leading"  # "trailing" with zero terminal SNR
    seed: int = 0


class TrainSettings(dg.Config):
    steps: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = 1e-3
    seed: int = 0
    cfg_dropout: float = 0.1
    snr_gamma: float | None = None  # min-SNR weighting; the teacher's loss uses the same


class SamplingSettings(dg.Config):
    steps: int = Field(default=50, ge=1)
    guidance_scale: float = 3.0
    guidance_rescale: float = 0.0  # blend toward the conditional output's std (keeps v-pred backgrounds)


class DiffusionSource(dg.ConfigurableResource):
    kind: str = "scratch"  # "scratch": train on the ingested corpus; "pretrained": a local SD folder
    pretrained_path: str | None = None  # diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)
    shipped_checkpoint: str | None = None  # a trained checkpoint to use when its corpus matches (demo)
    retrain: bool = False  # ignore shipped_checkpoint and train from scratch
    model: ScratchModelSettings = ScratchModelSettings()
    training: TrainSettings = TrainSettings()
    sampling: SamplingSettings = SamplingSettings()

    # Checked when the definitions load, not an hour into a run: the folder exists and nothing in it links out.
    @field_validator("pretrained_path", "shipped_checkpoint")
    @classmethod
    def _model_folder(cls, value: str | None, info) -> str | None:
        return None if value is None else str(model_folder(value, info.field_name))

    @model_validator(mode="after")
    def _kind(self) -> "DiffusionSource":
        if self.kind not in ("scratch", "pretrained"):
            raise ValueError(f"kind must be 'scratch' or 'pretrained', got {self.kind!r}")
        if self.kind == "pretrained" and not self.pretrained_path:
            raise ValueError("kind 'pretrained' needs pretrained_path: a local Stable Diffusion folder")
        return self

    def config(self) -> "ModelSource":
        from gda.diffusion import ScratchModelConfig
        from gda.model_source import ModelSource, SamplingConfig, TrainingRecipe

        return ModelSource(
            kind=self.kind,
            pretrained_path=Path(self.pretrained_path) if self.pretrained_path else None,
            shipped_checkpoint=Path(self.shipped_checkpoint) if self.shipped_checkpoint else None,
            retrain=self.retrain,
            model=ScratchModelConfig(**self.model.model_dump()),
            training=TrainingRecipe(**self.training.model_dump()),
            sampling=SamplingConfig(**self.sampling.model_dump()),
        )


class QueryPlan(dg.ConfigurableResource):
    """How many generated queries of each split, and how many per query-batch partition."""

    n_train: int = 240
    n_val: int = 40
    n_test: int = 40
    batch_size: int = Field(default=40, ge=1)
    seed: int = 0
    prompts_file: str | None = None  # parquet/txt of prompts for user corpora; default: held-out captions

    @field_validator("prompts_file")
    @classmethod
    def _resolved(cls, value: str | None) -> str | None:
        return None if value is None else str(resolved(value))

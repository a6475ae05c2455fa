"""The text-to-image model: where it comes from (trained from scratch here, or a local Stable Diffusion
folder), how it is trained, and how queries are sampled from it."""

import dagster as dg


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
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    cfg_dropout: float = 0.1
    snr_gamma: float | None = None  # min-SNR weighting; the teacher's loss uses the same


class SamplingSettings(dg.Config):
    steps: int = 50
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


class QueryPlan(dg.ConfigurableResource):
    """How many generated queries of each split, and how many per query-batch partition."""

    n_train: int = 240
    n_val: int = 40
    n_test: int = 40
    batch_size: int = 40
    seed: int = 0
    prompts_file: str | None = None  # parquet/txt of prompts for user corpora; default: held-out captions

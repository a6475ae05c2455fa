"""The model bundle: UNet, DDPM scheduler, text conditioner and (for latent models) a VAE.

Ways in: `build_from_scratch` (a tiny pixel-space UNet conditioned on MiniLM token states),
`load_pretrained` (a local Stable Diffusion folder) and `load` (a folder written by `save`). Weights
are read and written as safetensors only; nothing is ever unpickled and nothing touches the network.

A saved bundle is a diffusers folder (`unet/`, `scheduler/`, and for pretrained models also `vae/`,
`text_encoder/`, `tokenizer/`) plus `gda_model.json`, which says how to rebuild the conditioner.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from gda.diffusion.conditioning import TextConditioner, minilm_conditioner
from gda.paths import model_folder

MODEL_JSON = "gda_model.json"
NUM_TRAIN_TIMESTEPS = 1000
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Components whose weights must be present as safetensors (we never fall back to pickled .bin files).
_WEIGHTED = ("unet", "vae", "text_encoder")


class ModelFolderError(ValueError):
    """A model folder is missing a component, its safetensors weights, or our JSON."""


@dataclass(frozen=True)
class ScratchModelConfig:
    """A small pixel-space text-to-image UNet trained from scratch.

    `attention_levels[i]` puts transformer blocks (self- plus cross-attention) at resolution level i;
    level 0 is full resolution, where self-attention costs about 3x the whole model on CPU, hence off by
    default. The mid block always cross-attends.

    `rescale_betas_zero_snr` rescales the betas to zero terminal SNR (Lin et al. 2024), so the last training
    timestep is pure noise and the model must predict the image from the prompt alone; it needs
    v-prediction (an epsilon target says nothing about the image there). `timestep_spacing` is how DDIM
    picks its sampling timesteps; "trailing" starts at the last training timestep, which zero terminal SNR
    wants.
    """

    sample_size: int = 16
    block_channels: tuple[int, ...] = (32, 64)
    attention_levels: tuple[bool, ...] = (False, True)
    attention_heads: int = 4
    norm_num_groups: int = 8
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"
    text_max_length: int = 32
    rescale_betas_zero_snr: bool = False
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    seed: int = 0

    def __post_init__(self) -> None:
        # JSON round trips give lists; keep the frozen config hashable and comparable.
        object.__setattr__(self, "block_channels", tuple(int(c) for c in self.block_channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        if len(self.block_channels) != len(self.attention_levels):
            raise ValueError("block_channels and attention_levels need one entry per resolution level")
        if self.sample_size % 2 ** (len(self.block_channels) - 1):
            raise ValueError(f"sample_size {self.sample_size} must halve cleanly {len(self.block_channels) - 1} times")
        if any(c % self.norm_num_groups or c % self.attention_heads for c in self.block_channels):
            raise ValueError("every block channel count must divide by norm_num_groups and attention_heads")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if self.beta_schedule not in ("linear", "squaredcos_cap_v2"):
            raise ValueError(f"beta_schedule must be 'linear' or 'squaredcos_cap_v2', got {self.beta_schedule!r}")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(
                f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {self.timestep_spacing!r}"
            )
        if self.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
            raise ValueError(
                "rescale_betas_zero_snr needs prediction_type 'v_prediction' (epsilon is undefined at zero SNR)"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScratchModelConfig:
        return cls(**data)


@dataclass
class DiffusionBundle:
    """Everything needed to compute the denoising loss and to sample.

    `vae` is None for pixel-space models; then the UNet works on images in [-1, 1] directly.
    """

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    text: TextConditioner
    vae: AutoencoderKL | None = None
    kind: Literal["scratch", "pretrained"] = "scratch"
    config: ScratchModelConfig | None = field(default=None)
    # The min-SNR weighting the model was trained with (None: plain MSE). It lives here, not in the callers,
    # so that training, the EK-FAC fit, the unlearning step, the scores and the counterfactual losses all
    # compute the same loss: gda.registry.open_model sets it from the model card, gda.diffusion.train
    # from the recipe it trains with.
    snr_gamma: float | None = None

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the denoising loss is computed in: the UNet's parameters' (float32 in the product; a
        float64 UNet lets tests compare two computations of the same gradient on any CPU)."""
        return self.unet.dtype

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of what the UNet denoises: pixels, or latents with a VAE."""
        size = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), size, size)

    @property
    def image_size(self) -> int:
        """Side of the RGB images the bundle generates and is trained on."""
        if self.vae is None:
            return self.sample_shape[1]
        return self.sample_shape[1] * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: str | torch.device) -> DiffusionBundle:
        """Move every network to `device` (in place) and return the bundle."""
        self.unet.to(device)
        self.text.encoder.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self


def _ddpm_scheduler(config: ScratchModelConfig) -> DDPMScheduler:
    # clip_sample stays on (diffusers' default): pixel models generate in [-1, 1].
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.rescale_betas_zero_snr,
        timestep_spacing=config.timestep_spacing,
    )


def build_from_scratch(config: ScratchModelConfig) -> DiffusionBundle:
    """A freshly initialised pixel-space UNet (seeded by `config.seed`) conditioned on MiniLM states."""
    text = minilm_conditioner(config.text_max_length)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels))
    # fork_rng: seeding the initialisation must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = UNet2DConditionModel(
            sample_size=config.sample_size,
            in_channels=3,
            out_channels=3,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=config.block_channels,
            layers_per_block=1,
            norm_num_groups=config.norm_num_groups,
            cross_attention_dim=text.dim,
            # diffusers reads attention_head_dim as the number of heads in this model class.
            attention_head_dim=config.attention_heads,
        )
    return DiffusionBundle(unet.eval(), _ddpm_scheduler(config), text, None, "scratch", config)


def _checked_folder(path: str | Path, components: tuple[str, ...]) -> Path:
    """``path`` resolved, holding ``components`` with safetensors weights, and nothing that links outside it."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"model folder {path} does not exist")
    path = model_folder(path, "model folder")
    for name in components:
        folder = path / name
        if not folder.is_dir():
            raise ModelFolderError(f"{path} is missing {name}/ (expected {', '.join(c + '/' for c in components)})")
        if name in _WEIGHTED and not any(folder.glob("*.safetensors")):
            raise ModelFolderError(f"{folder} has no .safetensors weights (pickled .bin weights are not loaded)")
    return path


def load_pretrained(path: str | Path) -> DiffusionBundle:
    """A Stable Diffusion-layout folder on local disk: CLIP text encoder, VAE, UNet, DDPM scheduler.

    The scheduler folder may hold any diffusers scheduler config (SD ships PNDM); its betas and
    prediction type are read into a DDPMScheduler, which defines the training loss.
    """
    path = _checked_folder(path, SD_COMPONENTS)
    unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True, local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True, local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    # The position table bounds the usable length (77 for SD); tokenizers often report a huge default.
    max_length = int(encoder.config.max_position_embeddings)
    text = TextConditioner("clip", tokenizer, encoder, max_length, use_attention_mask=False)
    return DiffusionBundle(unet.eval(), scheduler, text, vae.eval().requires_grad_(False), "pretrained", None)


def save(bundle: DiffusionBundle, path: str | Path) -> Path:
    """Write the bundle as a diffusers folder with safetensors weights plus `gda_model.json`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bundle.unet.save_pretrained(path / "unet", safe_serialization=True)
    bundle.scheduler.save_pretrained(path / "scheduler")
    if bundle.kind == "pretrained":
        if bundle.vae is None:
            raise ValueError("a pretrained bundle must carry its VAE")
        bundle.vae.save_pretrained(path / "vae", safe_serialization=True)
        bundle.text.encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        bundle.text.tokenizer.save_pretrained(path / "tokenizer")
    meta = {
        "kind": bundle.kind,
        "text_conditioner": {"name": bundle.text.name, "max_length": bundle.text.max_length},
        "config": asdict(bundle.config) if bundle.config is not None else None,
    }
    # Written last: its presence marks a complete folder.
    (path / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load(path: str | Path) -> DiffusionBundle:
    """A bundle written by `save` (for a raw Stable Diffusion folder use `load_pretrained`)."""
    path = Path(path)
    meta_path = path / MODEL_JSON
    if not meta_path.is_file():
        raise ModelFolderError(f"{path} has no {MODEL_JSON}; not written by gda (use load_pretrained for SD folders)")
    meta = json.loads(meta_path.read_text())
    if meta["kind"] == "pretrained":
        return load_pretrained(path)
    if meta["kind"] != "scratch":
        raise ModelFolderError(f"{meta_path}: unknown kind {meta['kind']!r}")
    path = _checked_folder(path, ("unet", "scheduler"))
    if meta["text_conditioner"]["name"] != "minilm":
        raise ModelFolderError(
            f"{meta_path}: scratch models condition on minilm, not {meta['text_conditioner']['name']!r}"
        )
    config = ScratchModelConfig.from_dict(meta["config"])
    unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True, local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    text = minilm_conditioner(int(meta["text_conditioner"]["max_length"]))
    return DiffusionBundle(unet.eval(), scheduler, text, None, "scratch", config)

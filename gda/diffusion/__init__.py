"""The diffusion science core: model bundle, denoising loss with explicit draws, training, sampling.

Plain PyTorch + diffusers; never imports Dagster. Modules:
- `conditioning`: the frozen text conditioner (prompt -> token states) for MiniLM or CLIP.
- `bundle`: the model bundle (UNet, DDPM scheduler, text conditioner, optional VAE), built from scratch,
  loaded from a Stable Diffusion folder, saved and loaded as safetensors.
- `loss`: per-item denoising loss where every (t, eps) draw is a function of (seed, item id, draw index).
- `train`: seeded training from scratch with caption dropout and flips.
- `sample`: seeded DDIM sampling with classifier-free guidance.
"""

from gda.diffusion.bundle import (
    DiffusionBundle,
    ModelFolderError,
    ScratchModelConfig,
    build_from_scratch,
    load,
    load_pretrained,
    save,
)
from gda.diffusion.conditioning import TextConditioner
from gda.diffusion.loss import (
    Draws,
    draw_losses,
    encode_images,
    evaluate_loss,
    make_draws,
    per_item_loss,
    scoring_timesteps,
)
from gda.diffusion.sample import SampleResult, sample, to_pil
from gda.diffusion.train import TrainResult, train

__all__ = [
    "DiffusionBundle",
    "Draws",
    "ModelFolderError",
    "SampleResult",
    "ScratchModelConfig",
    "TextConditioner",
    "TrainResult",
    "build_from_scratch",
    "draw_losses",
    "encode_images",
    "evaluate_loss",
    "load",
    "load_pretrained",
    "make_draws",
    "per_item_loss",
    "sample",
    "save",
    "scoring_timesteps",
    "to_pil",
    "train",
]

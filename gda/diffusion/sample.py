"""Seeded DDIM sampling with classifier-free guidance.

Each query's starting noise comes from its own generator seeded by its seed, DDIM with eta = 0 adds no
further noise, and each query is denoised in its own UNet calls, so a (prompt, seed) pair gives the
same image, bit for bit, whatever list it is sampled in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from gda.diffusion.bundle import DiffusionBundle


@dataclass(frozen=True)
class SampleResult:
    """`samples`: the final model-space tensor (pixels in [-1, 1] or latents), exactly as denoised;
    `images`: RGB in [0, 1], (n, 3, H, W); `prompt_states`: the conditional states used (n, tokens, dim)."""

    samples: torch.Tensor
    images: torch.Tensor
    prompt_states: torch.Tensor


def initial_noise(seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The starting noise of one query, drawn on the CPU so every device starts from the same tensor."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode(bundle: DiffusionBundle, samples: torch.Tensor) -> torch.Tensor:
    """Model-space samples to RGB in [0, 1]."""
    if bundle.vae is not None:
        samples = bundle.vae.decode(samples / float(bundle.vae.config.scaling_factor)).sample
    return ((samples.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def sample(
    bundle: DiffusionBundle,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 50,
    guidance_scale: float = 3.0,
    guidance_rescale: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> SampleResult:
    """Generate one image per (prompt, seed) with `steps` DDIM steps (eta = 0).

    Guidance: out_uncond + scale * (out_cond - out_uncond) with the empty prompt as unconditional
    (what caption dropout trains); scale 1 skips the unconditional pass. `guidance_rescale` (phi in Lin et
    al. 2024, section 3.4) blends the guided output with a copy rescaled to the conditional output's standard
    deviation, which keeps strong guidance from over-saturating v-prediction / zero-terminal-SNR models;
    0 leaves the guided output as it is.

    `dtype` float16 / bfloat16 runs the UNet and VAE under autocast (what Stable Diffusion is sampled in
    on GPUs); the prompt states the teacher reuses are encoded in float32 all the same, and the samples
    are returned as float32.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    cond = bundle.text.encode_prompts(list(prompts))
    uncond = bundle.text.encode_prompts([""]) if guidance_scale != 1.0 else None
    with torch.autocast(bundle.device.type, dtype=dtype, enabled=dtype != torch.float32):
        samples = torch.cat(
            [
                _denoise(bundle, c[None], uncond, int(s), steps, guidance_scale, guidance_rescale)
                for c, s in zip(cond, seeds, strict=True)
            ]
        ).float()
        # Decoded one by one too, so the images are as batch-independent as the samples.
        images = torch.cat([decode(bundle, x[None]) for x in samples])
    return SampleResult(samples=samples, images=images, prompt_states=cond)


def _denoise(
    bundle: DiffusionBundle,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    seed: int,
    steps: int,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    # One query per UNet call: kernels picked by batch size round differently, and 20 guided DDIM
    # steps amplified batch-composition differences of 1e-6 to 3e-3, so batching would break
    # "same seed, same image".
    states = cond if uncond is None else torch.cat([uncond, cond])
    # A fresh scheduler per query: DDIM keeps the timestep schedule as mutable state.
    scheduler = DDIMScheduler.from_config(bundle.scheduler.config)
    scheduler.set_timesteps(steps, device=bundle.device)
    x = initial_noise(seed, bundle.sample_shape)[None].to(bundle.device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x if uncond is None else torch.cat([x, x]), t)
        out = bundle.unet(model_in, t, encoder_hidden_states=states).sample
        if uncond is not None:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
            if guidance_rescale > 0:
                out = rescale_guidance(out, out_cond, guidance_rescale)
        x = scheduler.step(out, t, x, eta=0.0).prev_sample
    return x


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Blend `guided` with itself rescaled to `cond`'s per-sample standard deviation (weight `phi`)."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """RGB tensors in [0, 1] (n, 3, H, W) to 8-bit PIL images."""
    arrays = (images.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]

"""The DDPM denoising loss on explicit, reproducible (t, eps) draws.

Every draw is a pure function of (seed, item id, draw index): its random stream comes from
`numpy.random.SeedSequence(seed, spawn_key=(item id, draw index))`, never from a shared generator, so a
loss does not depend on batch size, batch order or which other items share the batch. The same item id
with different prompts (one image, several captions) therefore sees the same draws, which is what a
paired comparison wants. The teacher reuses exactly these draws through `make_draws` / `draw_losses`.

Loss = mean over pixels (latent elements with a VAE) of the squared error of the model's prediction
target (eps, v or x0, as the scheduler config says), optionally min-SNR weighted, averaged over draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from gda.diffusion.bundle import DiffusionBundle

_UINT32 = 0xFFFFFFFF
_MAX_ID = 2**64


@dataclass(frozen=True)
class Draws:
    """Per-(item, draw) timesteps (n, d) int64 and noise (n, d, C, H, W) float32, on the CPU."""

    timesteps: torch.Tensor
    noise: torch.Tensor

    def __post_init__(self) -> None:
        if self.noise.shape[:2] != self.timesteps.shape:
            raise ValueError(f"noise {tuple(self.noise.shape)} does not match timesteps {tuple(self.timesteps.shape)}")


def scoring_timesteps(count: int = 20, num_train_timesteps: int = 1000) -> list[int]:
    """Evenly spaced fixed timesteps for scoring: 0, 50, ..., 950 for the defaults."""
    if not 1 <= count <= num_train_timesteps:
        raise ValueError(f"count must be in 1..{num_train_timesteps}, got {count}")
    return list(range(0, num_train_timesteps, num_train_timesteps // count))[:count]


def _check_id(value: int, what: str) -> int:
    value = int(value)
    if not 0 <= value < _MAX_ID:
        raise ValueError(f"{what} must be in [0, 2**64), got {value}")
    return value


def _stream(seed: int, item_id: int, draw_index: int) -> np.random.Generator:
    # Fixed-width 32-bit words keep the spawn key injective for ids up to 2**64. (torch's CPU generator
    # keeps only 32 seed bits, which would make distinct draws collide at corpus scale.)
    key = (item_id & _UINT32, item_id >> 32, draw_index & _UINT32, draw_index >> 32)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def make_draws(
    item_ids: Sequence[int] | torch.Tensor,
    draw_indices: Sequence[int],
    seed: int,
    sample_shape: tuple[int, int, int],
    timesteps: Sequence[int] | None = None,
    num_train_timesteps: int = 1000,
) -> Draws:
    """Draws for every (item, draw index) pair; `timesteps` (one per draw index) overrides uniform t.

    Each stream yields t first, then eps, so fixing t keeps the same eps as the uniform-t draw.
    """
    seed = _check_id(seed, "seed")
    items = [_check_id(i, "item id") for i in (item_ids.tolist() if isinstance(item_ids, torch.Tensor) else item_ids)]
    draws = [_check_id(k, "draw index") for k in draw_indices]
    if timesteps is not None and len(timesteps) != len(draws):
        raise ValueError(f"{len(timesteps)} timesteps given for {len(draws)} draw indices")
    t = np.empty((len(items), len(draws)), dtype=np.int64)
    noise = np.empty((len(items), len(draws), *sample_shape), dtype=np.float32)
    for i, item in enumerate(items):
        for j, draw in enumerate(draws):
            rng = _stream(seed, item, draw)
            t[i, j] = rng.integers(0, num_train_timesteps)
            rng.standard_normal(sample_shape, dtype=np.float32, out=noise[i, j])
    if timesteps is not None:
        t[:] = np.asarray(timesteps, dtype=np.int64)
    return Draws(torch.from_numpy(t), torch.from_numpy(noise))


@torch.no_grad()
def encode_images(bundle: DiffusionBundle, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """What the UNet denoises: images in [-1, 1] themselves, or VAE posterior means x scaling factor.

    The posterior mean (not a sample) keeps latents deterministic (gda.model_card.LATENT_ENCODING,
    recorded in a registered model's card). Returned on the bundle's device in the bundle's dtype.
    """
    if bundle.vae is None:
        return images.to(bundle.device, bundle.dtype)
    images = images.to(bundle.device, bundle.vae.dtype)
    scale = float(bundle.vae.config.scaling_factor)
    parts = [
        bundle.vae.encode(images[i : i + batch_size]).latent_dist.mean * scale
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts).to(bundle.dtype)


def model_space(bundle: DiffusionBundle, images_or_latents: torch.Tensor) -> torch.Tensor:
    """What the UNet denoises, from RGB images (encoded when the bundle has a VAE) or model-space inputs."""
    channels = images_or_latents.shape[1]
    if channels == bundle.sample_shape[0]:
        return images_or_latents.to(bundle.device, bundle.dtype)
    if bundle.vae is not None and channels == bundle.vae.config.in_channels:
        return encode_images(bundle, images_or_latents)
    raise ValueError(f"expected {bundle.sample_shape[0]}-channel model inputs or images, got {channels} channels")


def _min_snr_weight(bundle: DiffusionBundle, t: torch.Tensor, gamma: float) -> torch.Tensor:
    # Min-SNR-gamma (Hang et al. 2023), expressed for the scheduler's prediction target.
    alphas = bundle.scheduler.alphas_cumprod.to(t.device)[t]
    snr = alphas / (1 - alphas)
    clipped = snr.clamp(max=gamma)
    prediction = bundle.scheduler.config.prediction_type
    if prediction == "epsilon":
        return clipped / snr
    if prediction == "v_prediction":
        return clipped / (snr + 1)
    return clipped


class Noised(NamedTuple):
    """Every (item, draw) row of model-space inputs: one row per item and draw, item-major."""

    x: torch.Tensor  # the clean inputs, repeated per draw
    noise: torch.Tensor
    t: torch.Tensor
    states: torch.Tensor  # the prompt states, repeated per draw
    noisy: torch.Tensor  # what the UNet denoises


def noised(bundle: DiffusionBundle, x0: torch.Tensor, prompt_states: torch.Tensor, draws: Draws) -> Noised:
    """The UNet's inputs for model-space ``x0`` under ``draws``, on the bundle's device and dtype."""
    n, d = draws.timesteps.shape
    if x0.shape[0] != n or prompt_states.shape[0] != n:
        raise ValueError(f"{x0.shape[0]} inputs and {prompt_states.shape[0]} prompt states for {n} items")
    device = bundle.device
    x = x0.to(device, bundle.dtype).repeat_interleave(d, dim=0)
    states = prompt_states.to(device, bundle.dtype).repeat_interleave(d, dim=0)
    t = draws.timesteps.reshape(-1).to(device)
    noise = draws.noise.reshape(n * d, *x.shape[1:]).to(device, bundle.dtype)
    return Noised(x, noise, t, states, bundle.scheduler.add_noise(x, noise, t))


def draw_losses(
    bundle: DiffusionBundle,
    x0: torch.Tensor,
    prompt_states: torch.Tensor,
    draws: Draws,
) -> torch.Tensor:
    """Differentiable loss per (item, draw), shape (n, d), from model-space x0 and given draws, weighted as
    the model was trained (``bundle.snr_gamma``).

    All n*d noisy inputs go through one UNet call; chunk items outside if memory is short.
    """
    n, d = draws.timesteps.shape
    x, noise, t, states, noisy = noised(bundle, x0, prompt_states, draws)
    prediction = bundle.scheduler.config.prediction_type
    if prediction == "epsilon":
        target = noise
    elif prediction == "v_prediction":
        target = bundle.scheduler.get_velocity(x, noise, t)
    elif prediction == "sample":
        target = x
    else:
        raise ValueError(f"unsupported prediction type {prediction!r}")
    predicted = bundle.unet(noisy, t, encoder_hidden_states=states).sample
    losses = (predicted.to(target.dtype) - target).pow(2).mean(dim=(1, 2, 3))
    if bundle.snr_gamma is not None:
        losses = losses * _min_snr_weight(bundle, t, bundle.snr_gamma)
    return losses.view(n, d)


def per_item_loss(
    bundle: DiffusionBundle,
    images_or_latents: torch.Tensor,
    prompt_states: torch.Tensor,
    item_ids: Sequence[int] | torch.Tensor,
    draw_indices: Sequence[int],
    seed: int,
    timesteps: Sequence[int] | None = None,
) -> torch.Tensor:
    """Differentiable loss per item (n,), averaged over the draws `draw_indices` of each item id.

    `images_or_latents` are RGB in [-1, 1] (encoded through the VAE when there is one) or already in
    model space (as many channels as the UNet takes).
    """
    x0 = model_space(bundle, images_or_latents)
    draws = make_draws(
        item_ids, draw_indices, seed, bundle.sample_shape, timesteps, bundle.scheduler.config.num_train_timesteps
    )
    return draw_losses(bundle, x0, prompt_states, draws).mean(dim=1)


@torch.no_grad()
def evaluate_loss(
    bundle: DiffusionBundle,
    images_or_latents: torch.Tensor,
    prompt_states: torch.Tensor,
    item_ids: Sequence[int] | torch.Tensor,
    draw_indices: Sequence[int],
    seed: int,
    timesteps: Sequence[int] | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """`per_item_loss` for scoring: no autograd, `batch_size` items per UNet call, float32 on the CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = item_ids.tolist() if isinstance(item_ids, torch.Tensor) else list(item_ids)
    parts = [
        per_item_loss(
            bundle,
            images_or_latents[i : i + batch_size],
            prompt_states[i : i + batch_size],
            ids[i : i + batch_size],
            draw_indices,
            seed,
            timesteps,
        ).cpu()
        for i in range(0, len(ids), batch_size)
    ]
    return torch.cat(parts) if parts else torch.empty(0)

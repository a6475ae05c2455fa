"""Seeded training of a bundle's UNet on (image, captions) pairs with the denoising loss.

One generator seeded by `seed` decides batches (shuffled epochs), caption choice, caption dropout and
flips; the (t, eps) draws come from `make_draws` with the image index as item id and the step as draw
index. Only the UNet trains; the text conditioner and VAE stay frozen. Caption token states and model-space
inputs (both flips) are computed once up front, since both are frozen functions of the data.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gda.diffusion.bundle import DiffusionBundle
from gda.diffusion.loss import draw_losses, encode_images, make_draws


@dataclass(frozen=True)
class TrainResult:
    """`loss_curve`: mean training loss over each block of `log_every` steps; `seconds` includes the
    up-front encoding of captions and images."""

    loss_curve: list[float]
    seconds: float
    steps: int


def _caption_table(captions: Sequence[Sequence[str]]) -> tuple[list[str], list[list[int]]]:
    """Distinct prompts, with "" (the dropout prompt) first, and each image's caption indices into them."""
    index: dict[str, int] = {"": 0}
    per_image: list[list[int]] = []
    for i, caps in enumerate(captions):
        if not caps:
            raise ValueError(f"image {i} has no caption")
        per_image.append([index.setdefault(c, len(index)) for c in caps])
    return list(index), per_image


def train(
    bundle: DiffusionBundle,
    images: torch.Tensor,
    captions: Sequence[Sequence[str]],
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    cfg_dropout: float = 0.1,
    hflip: bool = True,
    log_every: int = 50,
    progress: bool = False,
    snr_gamma: float | None = None,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = 1.0,
) -> TrainResult:
    """Train `bundle.unet` in place for `steps` AdamW steps on `images` (N, 3, H, W) in [-1, 1].

    `captions[i]` lists image i's captions; each step picks one per item, replaced by the empty prompt
    with probability `cfg_dropout` (so classifier-free guidance has an unconditional model). Step s
    draws (t, eps) for image i as draw (seed, i, s): score with another seed, or the first scoring
    draws repeat noise the model trained on.
    """
    n = len(images)
    if n != len(captions):
        raise ValueError(f"{n} images but {len(captions)} caption lists")
    if n == 0 or steps < 1 or batch_size < 1 or log_every < 1:
        raise ValueError("need at least one image, and steps, batch_size and log_every >= 1")
    start = time.perf_counter()
    bundle.snr_gamma = snr_gamma
    prompts, caption_ids = _caption_table(captions)
    states = bundle.text.encode_prompts(prompts)
    x0 = encode_images(bundle, images)
    x0_flipped = encode_images(bundle, images.flip(-1)) if hflip else None
    unet = bundle.unet
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=weight_decay)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    curve: list[float] = []
    running = 0.0
    unet.train()
    # A progress bar on stderr lands in the run's compute log, where a user watches a long training run.
    for step in tqdm(range(steps), desc="train", unit="step", disable=not progress, mininterval=10):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        choice = torch.rand(len(idx), generator=generator).tolist()
        picks = torch.tensor([caption_ids[i][int(u * len(caption_ids[i]))] for i, u in zip(idx.tolist(), choice)])
        dropped = torch.rand(len(idx), generator=generator) < cfg_dropout
        prompt_ids = torch.where(dropped, 0, picks).to(states.device)
        rows = idx.to(x0.device)
        batch = x0[rows]
        if x0_flipped is not None:
            flip = (torch.rand(len(idx), generator=generator) < 0.5).to(x0.device)
            batch = torch.where(flip[:, None, None, None], x0_flipped[rows], batch)
        draws = make_draws(idx, [step], seed, bundle.sample_shape, None, bundle.scheduler.config.num_train_timesteps)
        loss = draw_losses(bundle, batch, states[prompt_ids], draws).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), max_grad_norm)
        optimizer.step()
        running += float(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append(running / ((step % log_every) + 1))
            running = 0.0
    unet.eval()
    return TrainResult(loss_curve=curve, seconds=time.perf_counter() - start, steps=steps)

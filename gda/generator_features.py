"""The generator's own view of an image, for the student study's features axis: the UNet's mid-block
activations on the noised image under its prompt, pooled over space and averaged over fixed draws.

The teacher's scores are gradients of this UNet, so its activations may carry what DINO, trained for other
purposes, does not. The draws are the teacher's kind (`gda.diffusion.loss.make_draws`: a function of seed,
item id and draw index), at fixed timesteps, so a feature does not depend on batching.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gda import layout
from gda.arrays import IdArray
from gda.diffusion.bundle import DiffusionBundle
from gda.diffusion.loss import make_draws, model_space
from gda.evaluation import Features
from gda.queries import load_generated
from gda.registry import open_model
from gda.store import Store
from gda.teacher_data import shard_items

TIMESTEPS = (100, 400, 700)  # low, middle and high noise: one draw each
SEED = 0  # of the draws; any fixed value: the features only need to be the same for every item's rows
ROWS_PER_CALL = 64


@torch.no_grad()
def unet_features(
    bundle: DiffusionBundle, images: torch.Tensor, states: torch.Tensor, ids: Sequence[int], seed: int
) -> np.ndarray:
    """(n, mid-block channels) float32: the mid block's output, mean over space and over the TIMESTEPS draws."""
    if not len(images) == len(states) == len(ids):
        raise ValueError(f"{len(images)} images, {len(states)} prompt states and {len(ids)} ids must pair up")
    captured: list[torch.Tensor] = []
    hook = bundle.unet.mid_block.register_forward_hook(lambda _m, _i, out: captured.append(out.mean(dim=(2, 3))))
    try:
        x0 = model_space(bundle, images)
        draws = make_draws(list(ids), range(len(TIMESTEPS)), seed, bundle.sample_shape, timesteps=TIMESTEPS)
        d = len(TIMESTEPS)
        x = x0.repeat_interleave(d, dim=0)
        cond = states.to(bundle.device, bundle.dtype).repeat_interleave(d, dim=0)
        t = draws.timesteps.reshape(-1).to(bundle.device)
        noise = draws.noise.reshape(len(x), *x.shape[1:]).to(bundle.device, bundle.dtype)
        noisy = bundle.scheduler.add_noise(x, noise, t)
        for start in range(0, len(x), ROWS_PER_CALL):
            rows = slice(start, start + ROWS_PER_CALL)
            bundle.unet(noisy[rows], t[rows], encoder_hidden_states=cond[rows])
    finally:
        hook.remove()
    return torch.cat(captured).view(len(ids), d, -1).mean(dim=1).float().cpu().numpy()


def with_generator_images(store: Store, features: Features, device: str, seed: int = SEED) -> Features:
    """``features`` with every image part (training shards and query batches) replaced by `unet_features`
    of the home's model; the text parts are kept."""
    bundle, _ = open_model(store.folder(layout.DIFFUSION_MODEL), device)
    image = {}
    for shard in features.image:
        images, states, ids = shard_items(bundle, store, shard)
        image[shard] = IdArray(np.asarray(ids, dtype=np.int64), unet_features(bundle, images, states, ids, seed))
    query_image = {}
    for key in features.query_image:
        batch = load_generated(store.file(layout.GENERATED_QUERIES, key))
        ids = batch.query_ids.tolist()
        values = unet_features(bundle, batch.samples, batch.prompt_states, ids, seed)
        query_image[key] = IdArray(np.asarray(ids, dtype=np.int64), values)
    return Features(image, features.text, query_image, features.query_text)

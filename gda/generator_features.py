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
from gda.diffusion.loss import make_draws, model_space, noised
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
    draws = make_draws(list(ids), range(len(TIMESTEPS)), seed, bundle.sample_shape, timesteps=TIMESTEPS)
    rows = noised(bundle, model_space(bundle, images), states, draws)
    captured: list[torch.Tensor] = []
    hook = bundle.unet.mid_block.register_forward_hook(lambda _m, _i, out: captured.append(out.mean(dim=(2, 3))))
    try:
        for start in range(0, len(rows.noisy), ROWS_PER_CALL):
            chunk = slice(start, start + ROWS_PER_CALL)
            bundle.unet(rows.noisy[chunk], rows.t[chunk], encoder_hidden_states=rows.states[chunk])
    finally:
        hook.remove()
    return torch.cat(captured).view(len(ids), len(TIMESTEPS), -1).mean(dim=1).float().cpu().numpy()


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

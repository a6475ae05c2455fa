"""The generator's image features: the mid block's pooled output under the item's own draws, the same
whatever the batching, and equal to a direct computation with the same draws."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gda import generator_features
from gda.diffusion import ScratchModelConfig, build_from_scratch, make_draws
from gda.diffusion.bundle import load, save

TINY = ScratchModelConfig(block_channels=(16, 32), attention_heads=2, norm_num_groups=4, text_max_length=8)


def test_unet_features_are_the_mid_block_mean_under_fixed_draws(tmp_path: Path, monkeypatch) -> None:
    save(build_from_scratch(TINY), tmp_path / "model")
    bundle = load(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 16, 16, generator=g) * 2 - 1
    states = torch.randn(5, 8, 384, generator=g)
    ids = [11, 12, 13, 14, 15]
    together = generator_features.unet_features(bundle, images, states, ids, seed=3)
    monkeypatch.setattr(generator_features, "ROWS_PER_CALL", 2)
    chunked = generator_features.unet_features(bundle, images, states, ids, seed=3)
    assert together.shape == (5, bundle.unet.config.block_out_channels[-1])
    assert torch.allclose(torch.from_numpy(chunked), torch.from_numpy(together), atol=1e-5)

    # One item by hand: its draws at the fixed timesteps, the mid block's output averaged over space and draws.
    timesteps = generator_features.TIMESTEPS
    draws = make_draws([13], range(len(timesteps)), 3, bundle.sample_shape, timesteps=timesteps)
    captured = []
    hook = bundle.unet.mid_block.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        x = images[2:3].repeat(len(timesteps), 1, 1, 1)
        t = draws.timesteps[0]
        noisy = bundle.scheduler.add_noise(x, draws.noise[0], t)
        bundle.unet(noisy, t, encoder_hidden_states=states[2:3].repeat(len(timesteps), 1, 1))
    hook.remove()
    expected = captured[0].mean(dim=(0, 2, 3))
    assert torch.allclose(torch.from_numpy(together[2]), expected, atol=1e-5)
    assert not torch.allclose(torch.from_numpy(together[1]), expected, atol=1e-3)
    with pytest.raises(ValueError):
        generator_features.unet_features(bundle, images, states, ids[:4], seed=3)

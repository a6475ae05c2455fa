"""gda.diffusion: reproducible loss draws, training, sampling, and model folder round trips (tiny models)."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from sdkit import write_tiny_stable_diffusion

from gda.diffusion import (
    DiffusionBundle,
    ModelFolderError,
    ScratchModelConfig,
    build_from_scratch,
    draw_losses,
    encode_images,
    evaluate_loss,
    load,
    load_pretrained,
    make_draws,
    per_item_loss,
    sample,
    save,
    scoring_timesteps,
    to_pil,
    train,
)

TINY = ScratchModelConfig(
    sample_size=16, block_channels=(16, 32), attention_levels=(False, True), attention_heads=2, text_max_length=8
)


@pytest.fixture(scope="module")
def scratch() -> DiffusionBundle:
    return build_from_scratch(TINY)


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_draws_are_a_function_of_seed_item_and_draw_index() -> None:
    shape = (3, 4, 4)
    together = make_draws([5, 9, 2], [0, 1, 7], seed=3, sample_shape=shape)
    alone = make_draws([9], [7, 1], seed=3, sample_shape=shape)
    assert torch.equal(together.noise[1, 2], alone.noise[0, 0])
    assert torch.equal(together.noise[1, 1], alone.noise[0, 1])
    assert together.timesteps[1, 2] == alone.timesteps[0, 0]
    assert not torch.equal(together.noise[0, 0], together.noise[1, 0])
    assert not torch.equal(together.noise[0, 0], together.noise[0, 1])
    other_seed = make_draws([5], [0], seed=4, sample_shape=shape)
    assert not torch.equal(other_seed.noise[0, 0], together.noise[0, 0])
    # Fixing t keeps each draw's noise, so scoring and uniform-t draws share eps.
    fixed = make_draws([5, 9, 2], [0, 1, 7], seed=3, sample_shape=shape, timesteps=[0, 500, 950])
    assert torch.equal(fixed.noise, together.noise)
    assert fixed.timesteps.tolist() == [[0, 500, 950]] * 3
    assert scoring_timesteps() == list(range(0, 1000, 50))
    with pytest.raises(ValueError):
        make_draws([-1], [0], seed=0, sample_shape=shape)


def test_loss_does_not_depend_on_batching_or_order(scratch: DiffusionBundle) -> None:
    n = 64
    images = _images(n)
    states = scratch.text.encode_prompts([f"icon number {i % 5}" for i in range(n)])
    ids = [1000 + 3 * i for i in range(n)]
    draws = [0, 1, 2]
    reference = evaluate_loss(scratch, images, states, ids, draws, seed=11, batch_size=64)
    for batch_size in (1, 7):
        got = evaluate_loss(scratch, images, states, ids, draws, seed=11, batch_size=batch_size)
        assert (got - reference).abs().max() <= 1e-6
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    shuffled = evaluate_loss(scratch, images[perm], states[perm], [ids[i] for i in perm], draws, seed=11, batch_size=7)
    assert (shuffled - reference[perm]).abs().max() <= 1e-6
    # The draws really matter: another seed gives other losses.
    assert not torch.allclose(evaluate_loss(scratch, images, states, ids, draws, seed=12), reference)


def test_loss_is_differentiable_and_weighting_applies(scratch: DiffusionBundle) -> None:
    images = _images(4, seed=1)
    states = scratch.text.encode_prompts(["a", "b", "c", "d"])
    scratch.unet.zero_grad(set_to_none=True)
    per_item_loss(scratch, images, states, [0, 1, 2, 3], [0, 1], seed=0).sum().backward()
    key = next(m for name, m in scratch.unet.named_modules() if name.endswith("attn2.to_k"))
    assert key.weight.grad is not None and key.weight.grad.abs().sum() > 0
    scratch.unet.zero_grad(set_to_none=True)
    with torch.no_grad():
        draws = make_draws([0, 1, 2, 3], [0, 1], seed=0, sample_shape=scratch.sample_shape, timesteps=[10, 900])
        plain = draw_losses(scratch, images, states, draws)
        weighted = draw_losses(replace(scratch, snr_gamma=5.0), images, states, draws)
    # Min-SNR-5 on eps-prediction scales down only the high-SNR (small t) draw.
    assert torch.all(weighted[:, 0] < plain[:, 0])
    assert torch.allclose(weighted[:, 1], plain[:, 1])


def test_v_prediction_model_trains_on_velocity() -> None:
    bundle = build_from_scratch(replace(TINY, prediction_type="v_prediction"))
    assert bundle.scheduler.config.prediction_type == "v_prediction"
    images = _images(2)
    states = bundle.text.encode_prompts(["a", "b"])
    draws = make_draws([0, 1], [0], seed=0, sample_shape=bundle.sample_shape, timesteps=[999])
    with torch.no_grad():
        loss = draw_losses(bundle, images, states, draws)
        predicted = bundle.unet(
            bundle.scheduler.add_noise(images, draws.noise[:, 0], draws.timesteps[:, 0]),
            draws.timesteps[:, 0],
            encoder_hidden_states=states,
        ).sample
    # At t = 999 the velocity is almost -x0, far from the noise an eps target would use.
    v_loss = (predicted - bundle.scheduler.get_velocity(images, draws.noise[:, 0], draws.timesteps[:, 0])).pow(2)
    assert torch.allclose(loss[:, 0], v_loss.mean(dim=(1, 2, 3)), atol=1e-6)


def _synthetic_dataset(n: int = 8) -> tuple[torch.Tensor, list[list[str]]]:
    """Half-plane images: a colour on the left or right half, described by their captions."""
    colours = {"red": (1.0, -1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}
    images, captions = [], []
    for i in range(n):
        name = list(colours)[i % 2]
        side = "left" if (i // 2) % 2 == 0 else "right"
        img = -torch.ones(3, 16, 16)
        cols = slice(0, 8) if side == "left" else slice(8, 16)
        img[:, :, cols] = torch.tensor(colours[name])[:, None, None]
        images.append(img)
        captions.append([f"{name} {side}", f"{side} half {name}"])
    return torch.stack(images), captions


def test_training_lowers_the_loss_on_fixed_draws_and_is_seeded(scratch: DiffusionBundle) -> None:
    bundle = copy.deepcopy(scratch)
    images, captions = _synthetic_dataset()
    states = bundle.text.encode_prompts([c[0] for c in captions])
    ids = list(range(len(images)))
    timesteps = scoring_timesteps(10)
    before = evaluate_loss(bundle, images, states, ids, range(10), seed=99, timesteps=timesteps).mean()
    initial = copy.deepcopy(bundle.unet.state_dict())
    result = train(bundle, images, captions, steps=40, batch_size=8, lr=2e-3, seed=5, log_every=10)
    after = evaluate_loss(bundle, images, states, ids, range(10), seed=99, timesteps=timesteps).mean()
    assert after < 0.8 * before
    assert result.steps == 40 and len(result.loss_curve) == 4 and result.seconds > 0
    assert result.loss_curve[-1] < result.loss_curve[0]
    trained = copy.deepcopy(bundle.unet.state_dict())
    bundle.unet.load_state_dict(initial)
    train(bundle, images, captions, steps=3, batch_size=4, seed=5, log_every=1)
    first = copy.deepcopy(bundle.unet.state_dict())
    bundle.unet.load_state_dict(initial)
    train(bundle, images, captions, steps=3, batch_size=4, seed=5, log_every=1)
    assert all(torch.equal(first[k], v) for k, v in bundle.unet.state_dict().items())
    assert not all(torch.equal(first[k], trained[k]) for k in first)


def test_sampling_is_seeded_per_query(scratch: DiffusionBundle) -> None:
    batch = sample(scratch, ["red left", "blue right", "red left"], [3, 4, 5], steps=4, guidance_scale=2.0)
    alone = sample(scratch, ["blue right"], [4], steps=4, guidance_scale=2.0)
    again = sample(scratch, ["blue right"], [4], steps=4, guidance_scale=2.0)
    assert torch.equal(alone.samples, again.samples)
    assert torch.equal(batch.samples[1], alone.samples[0])
    assert torch.equal(batch.images[1], alone.images[0])
    assert not torch.allclose(batch.samples[0], batch.samples[2])
    assert batch.images.shape == (3, 3, 16, 16)
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    assert torch.equal(batch.prompt_states[1], alone.prompt_states[0])
    assert torch.equal(batch.prompt_states[0], scratch.text.encode_prompts(["red left"])[0])
    assert [im.size for im in to_pil(batch.images)] == [(16, 16)] * 3


def test_prompt_states_do_not_depend_on_the_batch(scratch: DiffusionBundle) -> None:
    prompts = [f"prompt {i} about a cat sitting on a mat" for i in range(40)]
    together = scratch.text.encode_prompts(prompts)
    assert together.shape == (40, TINY.text_max_length, 384)
    for i in (0, 17, 39):
        assert torch.equal(together[i], scratch.text.encode_prompts([prompts[i]])[0])
    assert torch.equal(together[5:9], scratch.text.encode_prompts(prompts[5:9]))
    assert not torch.equal(together[0], together[1])


def _only_safetensors(folder: Path) -> bool:
    files = [p.name for p in folder.rglob("*") if p.is_file()]
    return any(f.endswith(".safetensors") for f in files) and not any(
        f.endswith((".bin", ".pt", ".pth")) for f in files
    )


def test_scratch_save_load_reproduces_the_loss(scratch: DiffusionBundle, tmp_path: Path) -> None:
    images = _images(5, seed=2)
    states = scratch.text.encode_prompts(["x", "y", "z", "w", "v"])
    expected = evaluate_loss(scratch, images, states, range(5), [0, 1], seed=4)
    save(scratch, tmp_path / "model")
    meta = json.loads((tmp_path / "model" / "gda_model.json").read_text())
    assert meta["kind"] == "scratch" and meta["text_conditioner"]["name"] == "minilm"
    assert _only_safetensors(tmp_path / "model")
    loaded = load(tmp_path / "model")
    assert loaded.config == TINY
    loaded_states = loaded.text.encode_prompts(["x", "y", "z", "w", "v"])
    assert torch.equal(loaded_states, states)
    assert torch.equal(evaluate_loss(loaded, images, loaded_states, range(5), [0, 1], seed=4), expected)
    with pytest.raises(ModelFolderError, match="gda_model.json"):
        load(tmp_path)


def test_stable_diffusion_folder_loads_samples_and_scores(tmp_path: Path) -> None:
    sd = tmp_path / "sd"
    write_tiny_stable_diffusion(sd)
    bundle = load_pretrained(sd)
    assert bundle.kind == "pretrained" and bundle.vae is not None
    assert bundle.scheduler.config.beta_schedule == "scaled_linear"
    assert bundle.text.max_length == 16 and bundle.sample_shape == (4, 8, 8) and bundle.image_size == 16

    result = sample(bundle, ["red", "a cat"], [0, 1], steps=3, guidance_scale=4.0)
    assert result.samples.shape == (2, 4, 8, 8) and result.images.shape == (2, 3, 16, 16)
    assert result.prompt_states.shape == (2, 16, 32)
    assert torch.equal(sample(bundle, ["red"], [0], steps=3, guidance_scale=4.0).samples[0], result.samples[0])

    images = result.images * 2 - 1
    latents = encode_images(bundle, images)
    assert latents.shape == (2, 4, 8, 8)
    through_vae = per_item_loss(bundle, images, result.prompt_states, [7, 8], [0, 1], seed=2)
    on_latents = per_item_loss(bundle, latents, result.prompt_states, [7, 8], [0, 1], seed=2)
    assert torch.isfinite(through_vae).all()
    assert torch.equal(through_vae, on_latents)

    save(bundle, tmp_path / "copy")
    assert _only_safetensors(tmp_path / "copy")
    reloaded = load(tmp_path / "copy")
    assert torch.equal(reloaded.text.encode_prompts(["red", "a cat"]), result.prompt_states)
    assert torch.equal(per_item_loss(reloaded, images, result.prompt_states, [7, 8], [0, 1], seed=2), through_vae)


def test_incomplete_stable_diffusion_folder_is_named(tmp_path: Path) -> None:
    sd = tmp_path / "sd"
    write_tiny_stable_diffusion(sd)
    shutil.rmtree(sd / "vae")
    with pytest.raises(ModelFolderError, match="vae/"):
        load_pretrained(sd)
    for weights in (sd / "unet").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelFolderError):
        load_pretrained(sd)
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")


def test_every_loss_of_an_opened_model_uses_the_weighting_it_was_trained_with(tmp_path: Path) -> None:
    from gda.ekfac import DiffusionItems
    from gda.model_card import ModelCard, weights_version, write_card
    from gda.registry import open_model
    from gda.unlearning import baseline_losses

    images = _images(4, seed=3)
    captions = [["a"], ["b"], ["c"], ["d"]]
    trained = build_from_scratch(TINY)
    train(trained, images, captions, steps=2, batch_size=2, snr_gamma=5.0)
    assert trained.snr_gamma == 5.0
    save(trained, tmp_path / "weights")
    version = weights_version(tmp_path / "weights")
    write_card(tmp_path, ModelCard("scratch", "weights", version, training={"snr_gamma": 5.0}))
    opened, _ = open_model(tmp_path, "cpu")
    states = opened.text.encode_prompts(["a", "b", "c", "d"])
    ids, t = [0, 1, 2, 3], [10, 900]
    # Computed by hand: the plain per-draw MSE times the min-SNR-5 weight of eps-prediction, min(snr, 5) / snr.
    with torch.no_grad():
        draws = make_draws(ids, [0, 1], seed=1, sample_shape=opened.sample_shape, timesteps=t)
        plain = draw_losses(replace(opened, snr_gamma=None), images, states, draws)
        alphas = opened.scheduler.alphas_cumprod[torch.tensor(t)]
        snr = alphas / (1 - alphas)
        expected = (plain * (snr.clamp(max=5.0) / snr)).mean(dim=1)
    scored = baseline_losses(opened, images, states, ids, seed=1, timesteps=t, flip=False)[:, 0]
    assert torch.allclose(scored, expected, rtol=1e-5)
    items = DiffusionItems(opened, images, states, ids, [0, 1], seed=1, timesteps=t, batch_size=4)
    with torch.no_grad():
        fitted = items.loss_fn(next(iter(items)))
    assert torch.allclose(fitted, expected, rtol=1e-5)
    assert not torch.allclose(scored, plain.mean(dim=1), rtol=1e-3)

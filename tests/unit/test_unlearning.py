"""gda.unlearning: AbU+ query gradient, unlearning step, finite and first-order scores, ranking.

The tiny UNet is random; at its initialisation the cross-attention path barely moves the loss, so a
relative step of 1e-3 changes L(z) by ~1e-7, the float32 resolution of the loss, and finite scores are
quantisation noise. The fixture therefore scales up attn2.to_out (x30) and attn2.to_k/to_v (x3), which makes
the text path matter as it does in a trained model; τ is then ~1e-5 and finite vs first order is meaningful.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gda import ekfac, unlearning
from gda.diffusion import DiffusionBundle, ScratchModelConfig, build_from_scratch, draw_losses, make_draws
from gda.diffusion.loss import scoring_timesteps

TINY = ScratchModelConfig(block_channels=(16, 32), attention_heads=2, norm_num_groups=4, text_max_length=8)
N_TRAIN, N_QUERY, QUERY_DRAWS = 24, 3, 64
FIT_SEED, SCORE_SEED, QUERY_SEED = 1, 5, 2
QUERY_IDS = [100 + i for i in range(N_QUERY)]
IDS = list(range(1000, 1000 + N_TRAIN))  # train ids unlike positions, to catch id/position mix-ups
# Batched and per-query gradients sum the same float32 products (QUERY_DRAWS x tokens per entry) in another
# order: a relative difference of a few float32 epsilons (6e-8) times sqrt(terms), far below 1e-5.
FLOAT32_SUMS = 1e-5


@pytest.fixture(scope="module")
def bundle() -> DiffusionBundle:
    bundle = build_from_scratch(TINY)
    with torch.no_grad():
        for name, module in bundle.unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(30)
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                module.weight.mul_(3)
    return bundle


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.rand(N_TRAIN, 3, 16, 16, generator=g) * 2 - 1,
        "states": torch.randn(N_TRAIN, 8, 384, generator=g) + torch.randn(1, 8, 384, generator=g),
        "qx": torch.rand(N_QUERY, 3, 16, 16, generator=g) * 2 - 1,
        "qstates": torch.randn(N_QUERY, 8, 384, generator=g),
    }


@pytest.fixture(scope="module")
def modules(bundle: DiffusionBundle) -> dict[str, torch.nn.Module]:
    return ekfac.select_modules(bundle.unet, "kv")


@pytest.fixture(scope="module")
def factors(bundle: DiffusionBundle, data: dict[str, torch.Tensor], modules: dict) -> ekfac.EkfacFactors:
    items = ekfac.DiffusionItems(bundle, data["x"], data["states"], IDS, [0, 1], FIT_SEED, batch_size=12)
    return ekfac.fit_diffusion_factors(items, modules)


@pytest.fixture(scope="module")
def steps(bundle: DiffusionBundle, data: dict, modules: dict, factors: ekfac.EkfacFactors) -> list:
    out = []
    for q in range(N_QUERY):
        grad = unlearning.query_gradient(
            bundle, modules, data["qx"][q], data["qstates"][q], QUERY_IDS[q], QUERY_DRAWS, QUERY_SEED
        )
        out.append(unlearning.unlearning_step(factors, grad, 1e-3, modules))
    return out


@pytest.fixture(scope="module")
def baseline(bundle: DiffusionBundle, data: dict) -> torch.Tensor:
    return unlearning.baseline_losses(bundle, data["x"], data["states"], IDS, SCORE_SEED, batch_size=24)


@pytest.fixture(scope="module")
def side(bundle: DiffusionBundle, data: dict, modules: dict) -> unlearning.TrainingSide:
    return unlearning.training_side(bundle, modules, data["x"], data["states"], IDS, SCORE_SEED, batch_size=24)


@pytest.fixture(scope="module")
def finite(bundle: DiffusionBundle, data: dict, modules: dict, steps: list, baseline: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [
            unlearning.finite_scores(bundle, modules, s.delta, data["x"], data["states"], IDS, SCORE_SEED, baseline)
            for s in steps
        ]
    )


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _snapshot(bundle: DiffusionBundle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bundle.unet.state_dict().items()}


def _assert_same(bundle: DiffusionBundle, before: dict[str, torch.Tensor]) -> None:
    after = bundle.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ---------------------------------------------------------------------------------------------------------


def test_query_gradient_is_the_mean_over_draws_and_batch_invariant(
    bundle: DiffusionBundle, data: dict, modules: dict
) -> None:
    args = (bundle, modules, data["qx"][0], data["qstates"][0], QUERY_IDS[0], 10, QUERY_SEED)
    batched = unlearning.query_gradient(*args, batch_size=64)
    small = unlearning.query_gradient(*args, batch_size=3)
    bundle.unet.zero_grad(set_to_none=True)
    draws = make_draws([QUERY_IDS[0]], range(10), QUERY_SEED, bundle.sample_shape)
    loss = draw_losses(bundle, data["qx"][:1], data["qstates"][:1], draws).mean()
    params = [m.weight for m in modules.values()]
    grads = torch.autograd.grad(loss, params)
    for (name, module), grad in zip(modules.items(), grads, strict=True):
        assert module.bias is None
        assert torch.allclose(batched[name], grad.double(), rtol=1e-4, atol=1e-7 * grad.abs().max())
        assert torch.allclose(small[name], batched[name], rtol=1e-4, atol=1e-6 * grad.abs().max())
    assert all(p.grad is None for p in bundle.unet.parameters())


def test_batched_queries_match_the_per_query_path(
    bundle: DiffusionBundle,
    data: dict,
    modules: dict,
    factors: ekfac.EkfacFactors,
    steps: list,
    side: unlearning.TrainingSide,
) -> None:
    # Two queries per pass, so the three queries take two passes of different sizes.
    grads = unlearning.query_gradients(
        bundle, modules, data["qx"], data["qstates"], QUERY_IDS, QUERY_DRAWS, QUERY_SEED, rows_per_pass=2 * QUERY_DRAWS
    )
    batched = unlearning.unlearning_steps(factors, grads, 1e-3, modules)
    for q, (one, many) in enumerate(zip(steps, batched, strict=True)):
        assert many.eta == pytest.approx(one.eta, rel=FLOAT32_SUMS)
        single = unlearning.query_gradient(
            bundle, modules, data["qx"][q], data["qstates"][q], QUERY_IDS[q], QUERY_DRAWS, QUERY_SEED
        )
        for name in modules:
            assert float((grads[name][q] - single[name]).norm() / single[name].norm()) < FLOAT32_SUMS
            assert float((many.delta[name] - one.delta[name]).norm() / one.delta[name].norm()) < FLOAT32_SUMS
    per_query = unlearning.first_order_scores_fast(side, unlearning.stack_deltas([s.delta for s in steps]))
    together = unlearning.first_order_scores_fast(side, unlearning.stack_deltas([s.delta for s in batched]))
    assert float((together - per_query).norm() / per_query.norm()) < FLOAT32_SUMS
    assert torch.equal(unlearning.rank_scores(together), unlearning.rank_scores(per_query))


def test_step_has_the_requested_relative_size_and_ascends(
    bundle: DiffusionBundle, data: dict, modules: dict, factors: ekfac.EkfacFactors
) -> None:
    grad = unlearning.query_gradient(bundle, modules, data["qx"][0], data["qstates"][0], QUERY_IDS[0], 16, 7)
    theta = unlearning.parameter_norm(modules)
    for relative in (1e-3, 1e-2):
        step = unlearning.unlearning_step(factors, grad, relative, modules)
        norm = np.sqrt(sum(float(d.square().sum()) for d in step.delta.values()))
        assert norm / theta == pytest.approx(relative, rel=1e-9)
        assert step.eta > 0
        # Δ = η F⁻¹ ḡ exactly, and it ascends the query loss to first order: ⟨ḡ, Δ⟩ > 0.
        direction = ekfac.precondition(factors, grad)
        assert all(torch.allclose(step.delta[n], step.eta * direction[n]) for n in modules)
        assert sum(float((grad[n] * step.delta[n]).sum()) for n in modules) > 0
    # Applied, the parameters move by that relative amount (up to float32 rounding).
    before = _snapshot(bundle)
    with unlearning.applied_step(modules, step.delta):
        moved = np.sqrt(
            sum(
                float((m.weight.detach().double() - before[f"{n}.weight"].double()).square().sum())
                for n, m in modules.items()
            )
        )
    assert moved / theta == pytest.approx(1e-2, rel=1e-4)
    _assert_same(bundle, before)
    with pytest.raises(ValueError):
        unlearning.unlearning_step(factors, grad, 0.0, modules)


def test_restore_is_bit_exact(bundle: DiffusionBundle, data: dict, modules: dict, steps: list, baseline) -> None:
    before = _snapshot(bundle)
    unlearning.finite_scores(
        bundle,
        modules,
        steps[0].delta,
        data["x"][:5],
        data["states"][:5],
        IDS[:5],
        SCORE_SEED,
        baseline[:5],
        batch_size=2,
    )
    _assert_same(bundle, before)
    with pytest.raises(RuntimeError), unlearning.applied_step(modules, steps[1].delta):
        assert not torch.equal(next(iter(modules.values())).weight, before[f"{next(iter(modules))}.weight"])
        raise RuntimeError("boom")
    _assert_same(bundle, before)


def test_finite_scores_agree_with_first_order(side: unlearning.TrainingSide, finite: torch.Tensor, steps: list) -> None:
    first = unlearning.first_order_scores_fast(side, unlearning.stack_deltas([s.delta for s in steps]))
    assert first.shape == finite.shape == (N_QUERY, N_TRAIN)
    for q in range(N_QUERY):
        rho = _spearman(finite[q].numpy(), first[q].numpy())
        assert rho >= 0.99, (q, rho)
        assert float((finite[q].double() - first[q]).norm() / first[q].norm()) < 0.1


def test_fast_first_order_matches_per_item_gradients(
    bundle: DiffusionBundle, data: dict, modules: dict, side: unlearning.TrainingSide, steps: list
) -> None:
    deltas = unlearning.stack_deltas([s.delta for s in steps])
    fast = unlearning.first_order_scores_fast(side, deltas)
    single = unlearning.first_order_scores_fast(side, steps[1].delta)
    timesteps = scoring_timesteps()
    per_flip = []
    for x in (data["x"], torch.flip(data["x"], dims=[-1])):
        items = ekfac.DiffusionItems(
            bundle, x, data["states"], IDS, range(len(timesteps)), SCORE_SEED, timesteps=timesteps, batch_size=7
        )
        per_flip.append(ekfac.first_order_scores(modules, items.loss_fn, items, deltas).T)  # (q, n)
    reference = torch.maximum(*per_flip)
    scale = float(reference.abs().max())
    assert torch.allclose(fast, reference, rtol=1e-4, atol=1e-5 * scale)
    assert torch.allclose(single, fast[1], rtol=1e-5, atol=1e-7 * scale)
    # The directions in the η-free form: τ/η = ⟨∇L(z), F⁻¹ ḡ⟩.
    eta = steps[0].eta
    assert torch.allclose(fast[0] / eta, reference[0] / eta, rtol=1e-4, atol=1e-5 * scale / eta)


def test_scores_do_not_depend_on_batch_size_or_order(
    bundle: DiffusionBundle,
    data: dict,
    modules: dict,
    steps: list,
    baseline: torch.Tensor,
    side: unlearning.TrainingSide,
    finite: torch.Tensor,
) -> None:
    delta = steps[0].delta
    perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(3))
    ids = [IDS[i] for i in perm]
    x, states = data["x"][perm], data["states"][perm]
    fast = unlearning.first_order_scores_fast(side, delta)
    for batch_size in (1, 5, 24):
        base = unlearning.baseline_losses(bundle, x, states, ids, SCORE_SEED, batch_size=batch_size)
        torch.testing.assert_close(base, baseline[perm], rtol=1e-6, atol=1e-7)
        scores = unlearning.finite_scores(
            bundle, modules, delta, x, states, ids, SCORE_SEED, base, batch_size=batch_size
        )
        torch.testing.assert_close(scores, finite[0][perm], rtol=0, atol=1e-6 * float(finite[0].abs().max()))
        other = unlearning.training_side(bundle, modules, x, states, ids, SCORE_SEED, batch_size=batch_size)
        torch.testing.assert_close(
            unlearning.first_order_scores_fast(other, delta), fast[perm], rtol=1e-5, atol=1e-6 * float(fast.abs().max())
        )


def test_the_training_side_pass_gives_the_baseline_losses(
    side: unlearning.TrainingSide, baseline: torch.Tensor
) -> None:
    # Same draws, items and flips, and the same batch size: the forward pass of the gradients is the baseline.
    torch.testing.assert_close(side.losses, baseline, rtol=1e-6, atol=1e-7)


def test_baseline_once_equals_per_batch(bundle: DiffusionBundle, data: dict, baseline: torch.Tensor) -> None:
    parts = [
        unlearning.baseline_losses(bundle, data["x"][a:b], data["states"][a:b], IDS[a:b], SCORE_SEED)
        for a, b in ((0, 5), (5, 6), (6, 24))
    ]
    torch.testing.assert_close(torch.cat(parts), baseline, rtol=1e-6, atol=1e-7)
    assert baseline.shape == (N_TRAIN, 2) and not torch.equal(baseline[:, 0], baseline[:, 1])
    unflipped = unlearning.baseline_losses(bundle, data["x"][:4], data["states"][:4], IDS[:4], SCORE_SEED, flip=False)
    torch.testing.assert_close(unflipped[:, 0], baseline[:4, 0], rtol=1e-6, atol=1e-7)


def test_fast_path_refuses_draw_dependent_modules(bundle: DiffusionBundle, data: dict) -> None:
    attention = ekfac.select_modules(bundle.unet, "attention")
    with pytest.raises(ValueError, match="attn1"):
        unlearning.training_side(
            bundle, attention, data["x"][:2], data["states"][:2], IDS[:2], SCORE_SEED, timesteps=[0, 500]
        )
    convs = ekfac.select_modules(bundle.unet, "all")
    with pytest.raises(ValueError, match="Linear"):
        unlearning.training_side(bundle, convs, data["x"][:2], data["states"][:2], IDS[:2], SCORE_SEED)


def test_rank_scores() -> None:
    scores = torch.tensor([0.5, 2.0, 0.5, -1.0, 2.0])
    assert unlearning.rank_scores(scores).tolist() == [2, 0, 3, 4, 1]
    # Ties go to the lower train id, whatever the position.
    assert unlearning.rank_scores(scores, [9, 7, 3, 1, 5]).tolist() == [3, 1, 2, 4, 0]
    both = unlearning.rank_scores(torch.stack([scores, -scores]))
    assert both.shape == (2, 5) and both[1].tolist() == [1, 3, 2, 0, 4]


def test_training_side_round_trips_and_selects_rows_in_order(tmp_path: Path) -> None:
    from gda.unlearning import (
        TrainingSide,
        concat_sides,
        load_training_side,
        save_training_side,
        select_items,
        stored_losses,
    )

    generator = torch.Generator().manual_seed(0)
    parts = [
        TrainingSide(
            item_ids=ids,
            prompt_states=torch.randn(len(ids), 4, 6, generator=generator),
            output_grads={"m.to_k": torch.randn(len(ids), 2, 4, 3, generator=generator)},
            inputs={},
            uses_prompt_states=["m.to_k"],
            has_bias={"m.to_k": False},
            flip=True,
            losses=torch.rand(len(ids), 2, generator=generator),
        )
        for ids in ([10, 11, 12], [20, 21])
    ]
    whole = concat_sides(parts)
    save_training_side(tmp_path / "side.safetensors", whole, {"model_version": "abc"})
    loaded = load_training_side(tmp_path / "side.safetensors")
    ids, losses, provenance = stored_losses(tmp_path / "side.safetensors")
    assert ids == [10, 11, 12, 20, 21] and torch.equal(losses, whole.losses) and provenance == {"model_version": "abc"}
    assert loaded.item_ids == [10, 11, 12, 20, 21] and loaded.flip and loaded.uses_prompt_states == ["m.to_k"]
    assert torch.equal(loaded.output_grads["m.to_k"], whole.output_grads["m.to_k"])
    picked = select_items(loaded, [21, 10])
    assert torch.equal(picked.prompt_states, torch.stack([parts[1].prompt_states[1], parts[0].prompt_states[0]]))
    assert torch.equal(picked.losses, torch.stack([parts[1].losses[1], parts[0].losses[0]]))
    with pytest.raises(KeyError, match="no training-side gradients"):
        select_items(loaded, [99])

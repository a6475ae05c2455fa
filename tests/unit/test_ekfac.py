"""gda.ekfac: module selection, per-item gradients, EK-FAC against a dense brute force and against kronfluence.

The kronfluence checks (`pytest -k kronfluence`) need kronfluence 1.0.1 installed with --no-deps (plus
accelerate, einops, einconv, opt_einsum), which `scripts/install.sh --test` installs. They use one draw
per item: kronfluence's per-sample gradient assumes one row block of the module's leading dimension per
item.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gda import ekfac
from gda.diffusion import DiffusionBundle, ScratchModelConfig, build_from_scratch, draw_losses, make_draws

TINY = ScratchModelConfig(block_channels=(16, 32), attention_heads=2, norm_num_groups=4, text_max_length=8)
N_TRAIN, N_QUERY, QUERY_DRAWS = 12, 3, 4
TRAIN_SEED, QUERY_SEED = 1, 2
QUERY_IDS = [100 + i for i in range(N_QUERY)]


@pytest.fixture(scope="module")
def bundle() -> DiffusionBundle:
    return build_from_scratch(TINY)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.rand(N_TRAIN, 3, 16, 16, generator=g) * 2 - 1,
        # Prompt states with some shared structure, as real token states have.
        "states": torch.randn(N_TRAIN, 8, 384, generator=g) + torch.randn(1, 8, 384, generator=g),
        "qx": torch.rand(N_QUERY, 3, 16, 16, generator=g) * 2 - 1,
        "qstates": torch.randn(N_QUERY, 8, 384, generator=g),
    }


def _items(bundle: DiffusionBundle, data: dict[str, torch.Tensor]) -> ekfac.DiffusionItems:
    return ekfac.DiffusionItems(bundle, data["x"], data["states"], list(range(N_TRAIN)), [0], TRAIN_SEED, batch_size=5)


def _query_items(bundle: DiffusionBundle, data: dict[str, torch.Tensor]) -> ekfac.DiffusionItems:
    draws = list(range(QUERY_DRAWS))
    return ekfac.DiffusionItems(bundle, data["qx"], data["qstates"], QUERY_IDS, draws, QUERY_SEED, batch_size=N_QUERY)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    try:
        from scipy.stats import spearmanr
    except ImportError:
        ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
        return float(np.corrcoef(ra, rb)[0, 1])
    return float(spearmanr(a, b).statistic)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------------------
# Selection and layout
# ---------------------------------------------------------------------------------------------------------


def test_select_modules(bundle: DiffusionBundle) -> None:
    kv = ekfac.select_modules(bundle.unet, "kv")
    assert kv and all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in kv)
    assert all(isinstance(m, nn.Linear) and m.bias is None for m in kv.values())
    cross = ekfac.select_modules(bundle.unet, "cross_attention")
    attention = ekfac.select_modules(bundle.unet, "attention")
    everything = ekfac.select_modules(bundle.unet, "all")
    assert set(kv) < set(cross) < set(attention) < set(everything)
    assert all(".attn2." in name for name in cross)
    assert any(".attn1." in name for name in attention)
    assert any(isinstance(m, nn.Conv2d) for m in everything.values())
    order = [name for name, _ in bundle.unet.named_modules()]
    assert list(everything) == [name for name in order if name in everything]
    with pytest.raises(ValueError):
        ekfac.select_modules(bundle.unet, "mlp")  # type: ignore[arg-type]


def test_gradient_matrix_layout_round_trips() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    linear = nn.Linear(5, 2, bias=False)
    for module in (conv, linear):
        w = torch.randn_like(module.weight)
        b = torch.randn_like(module.bias) if module.bias is not None else None
        matrix = ekfac.gradient_matrix(module, w, b)
        assert tuple(matrix.shape) == ekfac.matrix_shape(module)
        w2, b2 = ekfac.split_matrix(module, matrix)
        assert torch.equal(w2, w) and (b2 is None if b is None else torch.equal(b2, b))
    before = conv.weight.detach().clone(), conv.bias.detach().clone()
    delta = torch.randn(ekfac.matrix_shape(conv))
    ekfac.add_to_parameters({"c": conv}, {"c": delta}, scale=0.5)
    assert torch.allclose(conv.weight, before[0] + 0.5 * delta[:, :-1].reshape(conv.weight.shape))
    assert torch.allclose(conv.bias, before[1] + 0.5 * delta[:, -1])


def test_per_item_gradients_match_an_autograd_loop_with_several_draws(
    bundle: DiffusionBundle, data: dict[str, torch.Tensor]
) -> None:
    # Three items with two draws each, every Linear and Conv2d (biases, strided convs, time embedding).
    # In float64: a float32 batch of 3 and a batch of 1 take different conv kernels, whose rounding differs
    # by CPU (it broke rtol 1e-4 on AMD EPYC); in float64 that rounding is ~1e-16, far below any real bug.
    double = copy.deepcopy(bundle)
    double.unet.double()
    items = ekfac.DiffusionItems(double, data["x"][:3], data["states"][:3], [4, 5, 6], [0, 1], seed=3, batch_size=3)
    modules = ekfac.select_modules(double.unet, "all")
    batch = next(iter(items))
    fast = ekfac.per_item_gradients(modules, items.loss_fn, batch)
    for i in range(3):
        double.unet.zero_grad(set_to_none=True)
        draws = make_draws([batch.item_ids[i]], [0, 1], 3, double.sample_shape)
        draw_losses(double, batch.x0[i : i + 1], batch.prompt_states[i : i + 1], draws).mean().backward()
        for name, module in modules.items():
            expected = ekfac.gradient_matrix(module)
            assert expected.dtype == torch.float64
            assert torch.allclose(fast[name][i], expected, rtol=1e-9, atol=1e-12 * expected.abs().max()), name


def test_fit_needs_reiterable_batches(bundle: DiffusionBundle, data: dict[str, torch.Tensor]) -> None:
    items = _items(bundle, data)
    with pytest.raises(TypeError):
        ekfac.fit_ekfac(ekfac.select_modules(bundle.unet), items.loss_fn, iter(items))


# ---------------------------------------------------------------------------------------------------------
# Dense brute force for one small Linear
# ---------------------------------------------------------------------------------------------------------


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(x)))


def test_ekfac_matches_a_dense_brute_force() -> None:
    torch.manual_seed(1)
    model = _Toy().double()
    n, rows, tokens = 7, 2, 3  # each item owns 2 leading rows (like draws) of 3 tokens
    x = torch.randn(n * rows, tokens, 4, dtype=torch.float64)
    y = torch.randn(n * rows, tokens, 2, dtype=torch.float64)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        sel = torch.cat([torch.arange(i * rows, (i + 1) * rows) for i in idx.tolist()])
        err = (model(x[sel]) - y[sel]).pow(2).mean(dim=(1, 2))
        return err.view(len(idx), rows).mean(dim=1)

    modules = {"lin": model.lin}
    batches = [torch.arange(0, 4), torch.arange(4, n)]
    factors = ekfac.fit_ekfac(modules, loss_fn, batches)
    mf = factors["lin"]

    # Independent computation: per-item autograd gradients, explicit covariances, dense Kronecker eigenbasis.
    grads, a_rows, g_rows = [], [], []
    for i in range(n):
        model.zero_grad()
        captured: dict[str, torch.Tensor] = {}
        handle = model.lin.register_forward_hook(lambda m, inp, out, c=captured: c.update(a=inp[0], out=out))
        loss = loss_fn(torch.tensor([i]))
        handle.remove()
        (g_out,) = torch.autograd.grad(loss, captured["out"], retain_graph=True)
        loss.backward()
        grads.append(torch.cat([model.lin.weight.grad, model.lin.bias.grad[:, None]], dim=1).clone())
        a = captured["a"].reshape(-1, 4)
        a_rows.append(torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1).detach())
        g_rows.append(g_out.reshape(-1, 3))
    a_all, g_all = torch.cat(a_rows), torch.cat(g_rows)
    A = sum(torch.outer(r, r) for r in a_all) / len(a_all)
    G = sum(torch.outer(r, r) for r in g_all) / len(g_all)
    assert torch.allclose(mf.activation_covariance_mean(), A, atol=1e-12)
    assert torch.allclose(mf.gradient_covariance_mean(), G, atol=1e-14)
    _, q_a = torch.linalg.eigh(A)
    _, q_g = torch.linalg.eigh(G)
    Q = torch.kron(q_g, q_a)  # row-major vec: vec(Q_Gᵀ W Q_A) = Qᵀ vec(W)
    lam = torch.stack([(Q.T @ g.reshape(-1)) ** 2 for g in grads]).mean(dim=0)
    assert torch.allclose(mf.corrected_eigenvalues().reshape(-1), lam, rtol=1e-8, atol=1e-14)

    damping = 0.1 * float(lam.mean())
    fisher = Q @ torch.diag(lam + damping) @ Q.T
    v = torch.randn(3, 5, dtype=torch.float64)
    expected = torch.linalg.solve(fisher, v.reshape(-1)).reshape(3, 5)
    got = ekfac.precondition(factors, {"lin": v})["lin"]
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
    absolute = ekfac.precondition(factors, {"lin": v}, damping=damping)["lin"]
    assert torch.allclose(absolute, got, rtol=1e-10, atol=0)
    # Batched input and the Fisher product invert each other (undamped, positive Λ).
    stacked = torch.stack([v, 2 * v])
    assert torch.allclose(ekfac.precondition(factors, {"lin": stacked})["lin"][1], 2 * got)
    round_trip = ekfac.precondition(factors, ekfac.fisher_vector_product(factors, {"lin": v}), damping=0.0)["lin"]
    assert torch.allclose(round_trip, v, rtol=1e-6, atol=1e-8)
    # First-order scores are inner products of per-item gradients with the directions.
    scores = ekfac.first_order_scores(modules, loss_fn, batches, {"lin": got[None]})
    assert torch.allclose(scores[:, 0], torch.stack([(g * got).sum() for g in grads]), rtol=1e-8)


def test_save_and_load_round_trip(bundle: DiffusionBundle, data: dict[str, torch.Tensor], tmp_path: Path) -> None:
    items = _items(bundle, data)
    modules = ekfac.select_modules(bundle.unet, "kv")
    factors = ekfac.fit_ekfac(modules, items.loss_fn, items)
    folder = ekfac.save_factors(factors, tmp_path / "factors_kv")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{name}.safetensors" for name in ekfac.FACTOR_NAMES] + ["factor_arguments.json"]
    )
    loaded = ekfac.load_factors(folder)
    assert loaded.names() == factors.names()
    for name in factors.names():
        for key in ekfac.FACTOR_NAMES:
            assert torch.equal(getattr(loaded[name], key), getattr(factors[name], key)), (name, key)
    assert loaded[name].num_lambda_processed.tolist() == [N_TRAIN]
    grads = {name: torch.randn(ekfac.matrix_shape(m)) for name, m in modules.items()}
    mine, theirs = ekfac.precondition(factors, grads), ekfac.precondition(loaded, grads)
    assert all(torch.equal(mine[name], theirs[name]) for name in grads)
    mf = factors[name]
    assert ekfac.damping_value(mf) == pytest.approx(0.1 * float(mf.corrected_eigenvalues().mean()))
    assert ekfac.damping_value(mf, damping=1e-3) == 1e-3


# ---------------------------------------------------------------------------------------------------------
# kronfluence as the oracle
# ---------------------------------------------------------------------------------------------------------


def _kronfluence_run(bundle: DiffusionBundle, data: dict[str, torch.Tensor], which: str, out: Path) -> dict:
    import time

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    modules = ekfac.select_modules(bundle.unet, which)  # type: ignore[arg-type]
    scheduler = bundle.scheduler

    class DiffusionTask(Task):
        # The per-item loss of `draw_losses` (epsilon target, one draw per row), summed over the batch.
        def compute_train_loss(self, batch, model, sample=False):  # type: ignore[no-untyped-def]
            x0, states, t, noise = batch
            predicted = model(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=states).sample
            return (predicted - noise).pow(2).mean(dim=(1, 2, 3)).sum()

        def compute_measurement(self, batch, model):  # type: ignore[no-untyped-def]
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):  # type: ignore[no-untyped-def]
            return list(modules)

    train = make_draws(list(range(N_TRAIN)), [0], TRAIN_SEED, bundle.sample_shape)
    train_set = TensorDataset(data["x"], data["states"], train.timesteps[:, 0], train.noise[:, 0])
    # One row per (query, draw); the scores of a query's rows average to the score of its mean gradient.
    query = make_draws(QUERY_IDS, list(range(QUERY_DRAWS)), QUERY_SEED, bundle.sample_shape)
    query_set = TensorDataset(
        data["qx"].repeat_interleave(QUERY_DRAWS, 0),
        data["qstates"].repeat_interleave(QUERY_DRAWS, 0),
        query.timesteps.reshape(-1),
        query.noise.reshape(-1, *bundle.sample_shape),
    )
    task = DiffusionTask()
    model = prepare_model(copy.deepcopy(bundle.unet), task)
    analyzer = Analyzer(
        "gda", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=str(out), log_level=logging.WARNING
    )
    start = time.perf_counter()
    analyzer.fit_all_factors(
        "kf",
        train_set,
        per_device_batch_size=5,
        factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
        overwrite_output_dir=True,
    )
    kf_seconds = time.perf_counter() - start

    def pairwise(factors_name: str) -> torch.Tensor:
        # damping_factor=None: kronfluence damps with 0.1 x mean(Lambda) per module (factor/config.py, Ekfac.prepare).
        analyzer.compute_pairwise_scores(
            f"scores_{factors_name}",
            factors_name,
            query_set,
            train_set,
            per_device_query_batch_size=N_QUERY * QUERY_DRAWS,
            per_device_train_batch_size=5,
            score_args=ScoreArguments(damping_factor=None),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores(f"scores_{factors_name}")["all_modules"]
        return scores.reshape(N_QUERY, QUERY_DRAWS, N_TRAIN).mean(dim=1).double()

    items = _items(bundle, data)
    start = time.perf_counter()
    ours = ekfac.fit_ekfac(modules, items.loss_fn, items)
    our_seconds = time.perf_counter() - start
    queries = _query_items(bundle, data)
    query_grads = ekfac.per_item_gradients(modules, queries.loss_fn, next(iter(queries)))

    def our_scores(factors: ekfac.EkfacFactors) -> torch.Tensor:
        directions = ekfac.precondition(factors, query_grads)
        return ekfac.first_order_scores(modules, items.loss_fn, items, directions).T

    ekfac.save_factors(ours, analyzer.factors_output_dir("ours"))
    return {
        "modules": modules,
        "ours": ours,
        "theirs": ekfac.load_factors(analyzer.factors_output_dir("kf")),
        "their_raw": analyzer.load_covariance_matrices("kf"),
        "kf_scores": pairwise("kf"),
        "kf_scores_with_our_factors": pairwise("ours"),
        "our_scores": our_scores(ours),
        "our_scores_with_their_factors": None,
        "our_scores_fn": our_scores,
        "seconds": {"ours": our_seconds, "kronfluence": kf_seconds},
    }


@pytest.fixture(scope="module", params=["kv", "all"])
def kronfluence_run(
    request: pytest.FixtureRequest, bundle: DiffusionBundle, data: dict[str, torch.Tensor], tmp_path_factory
) -> dict:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # kronfluence's torch.cuda.amp.GradScaler
        run = _kronfluence_run(bundle, data, request.param, tmp_path_factory.mktemp(f"kronfluence_{request.param}"))
    run["our_scores_with_their_factors"] = run["our_scores_fn"](run["theirs"])
    print(f"[{request.param}] fit seconds: {run['seconds']}")
    return run


def test_kronfluence_covariances_and_lambda_match(kronfluence_run: dict) -> None:
    ours, theirs, raw = kronfluence_run["ours"], kronfluence_run["theirs"], kronfluence_run["their_raw"]
    worst = {"A": 0.0, "G": 0.0, "Lambda": 0.0}
    for name in kronfluence_run["modules"]:
        # kronfluence's own normalisation of its raw sums (sum / count), float32 accumulation on its side.
        a = raw["activation_covariance"][name].double() / raw["num_activation_covariance_processed"][name]
        g = raw["gradient_covariance"][name].double() / raw["num_gradient_covariance_processed"][name]
        worst["A"] = max(worst["A"], _rel(ours[name].activation_covariance_mean(), a))
        worst["G"] = max(worst["G"], _rel(ours[name].gradient_covariance_mean(), g))
        # Λ in (sign-free) eigenbases; independent bases agree wherever the spectrum is not degenerate.
        lam = _rel(ours[name].corrected_eigenvalues(), theirs[name].corrected_eigenvalues())
        worst["Lambda"] = max(worst["Lambda"], lam)
        assert ours[name].num_lambda_processed.tolist() == theirs[name].num_lambda_processed.tolist() == [N_TRAIN]
        assert (
            ours[name].num_activation_covariance_processed.tolist()
            == theirs[name].num_activation_covariance_processed.tolist()
        )
    print("max relative errors:", worst)
    assert worst["A"] <= 1e-4 and worst["G"] <= 1e-4
    assert worst["Lambda"] <= 1e-4


def test_kronfluence_pairwise_scores_match_first_order_scores(kronfluence_run: dict) -> None:
    ours, theirs = kronfluence_run["our_scores"], kronfluence_run["kf_scores"]
    rhos = [_spearman(ours[q].numpy(), theirs[q].numpy()) for q in range(N_QUERY)]
    scale = float(theirs.abs().max())
    print("spearman per query:", rhos, "max abs diff / max |score|:", float((ours - theirs).abs().max()) / scale)
    assert min(rhos) >= 0.999
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * scale)


def test_kronfluence_factors_load_directly(kronfluence_run: dict) -> None:
    # Their fitted factors through our precondition, and our saved factors through their scorer.
    theirs = kronfluence_run["kf_scores"]
    scale = float(theirs.abs().max())
    assert torch.allclose(kronfluence_run["our_scores_with_their_factors"], theirs, rtol=1e-3, atol=1e-4 * scale)
    ours = kronfluence_run["our_scores"]
    assert torch.allclose(kronfluence_run["kf_scores_with_our_factors"], ours, rtol=1e-3, atol=1e-4 * scale)

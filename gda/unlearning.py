"""AbU+ (attribution by unlearning with an EK-FAC step) for one query ẑ = (its generated sample, its prompt).

Plain PyTorch, no Dagster. The steps (docs: /work/shared/design/method.md, Teacher items 1-7):

1. `query_gradient`: ḡ = mean over `n_draws` (uniform t, ε) draws of ∇θ L(ẑ, θ0) on the selected modules,
   every draw from (seed, query id, draw index) through `make_draws`, `batch_size` draws per backward.
   `query_gradients` computes the same for many queries in shared forward and backward passes (per-item
   gradients of each query's own rows); the teacher uses it, `query_gradient` is the one-query reference.
2. `unlearning_step`: Δ = η F⁻¹ ḡ (EK-FAC `precondition`) with η chosen so that ‖Δ‖ / ‖θ0‖ over all the
   selected modules' parameters together equals `relative_step`. It is gradient *ascent* on the query
   loss: θ′ = θ0 + Δ.
3. Finite mode: `finite_scores` gives τ(ẑ, z) = L(z, θ′) − L(z, θ0) on fixed scoring draws (timesteps
   0, 50, ..., 950 by default, one noise each, from (seed, item id, draw index)), max over the image and its
   horizontal flip. L(z, θ0) is query-independent: `baseline_losses` computes it once, (n, 2) = (as is,
   flipped), for every query to reuse. θ′ is applied by `applied_step`, which restores θ0 from saved copies
   (bit-identical), never by subtracting.
4. First-order mode: τ ≈ ⟨∇L(z), Δ⟩. For modules whose input does not depend on the draw (the cross-attention
   K/V projections, whose input is the caption's token states A_z), ∇W L(z) = G_zᵀ A_z with G_z = the output
   gradients summed over the item's draws. `training_side` records G_z for every item and flip in one
   batched forward + backward per batch (query-independent, computed once; G_z and A_z take L·(d_out + d_in)
   floats per item where the gradient takes d_out·d_in); `first_order_scores_fast` then forms a chunk's
   per-item gradients G_zᵀ A_z in memory and scores many queries against them in one matmul.
   Module sets whose input depends on the draw (self-attention, convolutions, ...) are refused with a
   ValueError naming them; use `gda.ekfac.first_order_scores` (per-item gradients) for those.
5. `rank_scores`: rank 0 = most influential (highest τ), ties broken by ascending train id.

Flips: the image as given (RGB in [-1, 1], or model-space latents) is flipped along its last (width) axis
*before* any VAE encoding, and both orientations of an item use the same draws (same item id): a paired
comparison. `flip=False` scores the image as is only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from gda import ekfac
from gda.diffusion.bundle import DiffusionBundle
from gda.diffusion.loss import draw_losses, make_draws, model_space, scoring_timesteps

DEFAULT_RELATIVE_STEP = 1e-3


def _ids(item_ids: Sequence[int] | torch.Tensor) -> list[int]:
    return [int(i) for i in (item_ids.tolist() if isinstance(item_ids, torch.Tensor) else item_ids)]


def _params(modules: Mapping[str, nn.Module]) -> list[torch.Tensor]:
    return [p for m in modules.values() for p in m.parameters(recurse=False)]


def _num_train_timesteps(bundle: DiffusionBundle) -> int:
    return int(bundle.scheduler.config.num_train_timesteps)


# ---------------------------------------------------------------------------------------------------------
# 1. The query gradient
# ---------------------------------------------------------------------------------------------------------


def query_gradient(
    bundle: DiffusionBundle,
    modules: Mapping[str, nn.Module],
    sample: torch.Tensor,
    prompt_states: torch.Tensor,
    query_id: int,
    n_draws: int,
    seed: int,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """ḡ = mean over draws 0..n_draws-1 of ∇θ L(ẑ, θ0), per module in the joint layout, float64.

    `sample` is the query's exact generated sample, (C, H, W) or (1, C, H, W): RGB in [-1, 1] (VAE-encoded when
    the bundle has a VAE) or model-space latents. `prompt_states` (L, D) or (1, L, D). t is uniform on the
    scheduler's training timesteps. Draw i comes from (seed, query_id, i): the result does not depend on
    `batch_size` beyond float summation order.
    """
    if n_draws < 1 or batch_size < 1:
        raise ValueError(f"n_draws and batch_size must be >= 1, got {n_draws} and {batch_size}")
    x0 = model_space(bundle, sample.unsqueeze(0) if sample.dim() == 3 else sample)
    states = prompt_states.unsqueeze(0) if prompt_states.dim() == 2 else prompt_states
    if x0.shape[0] != 1 or states.shape[0] != 1:
        raise ValueError("query_gradient takes one query: one sample and one prompt")
    names = list(modules)
    total: dict[str, torch.Tensor] = {}
    with ekfac._weights_require_grad(modules):
        for start in range(0, n_draws, batch_size):
            indices = list(range(start, min(start + batch_size, n_draws)))
            draws = make_draws([query_id], indices, seed, bundle.sample_shape, None, _num_train_timesteps(bundle))
            loss = draw_losses(bundle, x0, states, draws).sum()
            owned = [list(modules[name].parameters(recurse=False)) for name in names]
            flat = torch.autograd.grad(loss, [p for ps in owned for p in ps], allow_unused=True)
            position = 0
            for name, ps in zip(names, owned, strict=True):
                module, grads = modules[name], flat[position : position + len(ps)]
                position += len(ps)
                weight_grad = grads[0] if grads[0] is not None else torch.zeros_like(module.weight)
                bias_grad = grads[1] if len(grads) > 1 else None
                matrix = ekfac.gradient_matrix(module, weight_grad, bias_grad).to(torch.float64)
                total[name] = total[name] + matrix if name in total else matrix
    return {name: g / n_draws for name, g in total.items()}


def query_gradients(
    bundle: DiffusionBundle,
    modules: Mapping[str, nn.Module],
    samples: torch.Tensor,
    prompt_states: torch.Tensor,
    query_ids: Sequence[int],
    n_draws: int,
    seed: int,
    rows_per_pass: int = 256,
) -> dict[str, torch.Tensor]:
    """`query_gradient` of many queries at once: (q, d_out, d_in [+1]) per module, float64, the same draws.

    Several queries' draws share one forward and one backward (about ``rows_per_pass`` UNet rows), and each
    query's gradient is summed from its own rows' module inputs and output gradients
    (`ekfac.per_item_gradients`), so batching changes nothing but float summation order. On 2 CPU cores with
    the demo's model and 48 draws: 0.14 s per query at 256 rows, 0.32 s at 512 (cache-bound), 0.20 s one
    query at a time.
    """
    ids = _ids(query_ids)
    if n_draws < 1 or rows_per_pass < 1:
        raise ValueError(f"n_draws and rows_per_pass must be >= 1, got {n_draws} and {rows_per_pass}")
    if not len(ids) == len(samples) == len(prompt_states):
        raise ValueError("samples, prompt_states and query_ids need one entry per query")
    x0 = model_space(bundle, samples)
    per_pass = max(1, rows_per_pass // n_draws)
    parts = []
    for start in range(0, len(ids), per_pass):
        chunk = ids[start : start + per_pass]
        draws = make_draws(chunk, range(n_draws), seed, bundle.sample_shape, None, _num_train_timesteps(bundle))

        def summed_losses(
            _: object, x0=x0[start : start + len(chunk)], states=prompt_states[start : start + len(chunk)], draws=draws
        ) -> torch.Tensor:
            return draw_losses(bundle, x0, states, draws).sum(dim=1)

        # Summed in float32, as autograd sums a weight gradient over rows; the mean is taken in float64.
        grads = ekfac.per_item_gradients(modules, summed_losses, None, dtype=torch.float32)
        parts.append({name: g.double() for name, g in grads.items()})
    return {name: torch.cat([part[name] for part in parts]) / n_draws for name in modules}


# ---------------------------------------------------------------------------------------------------------
# 2. The unlearning step
# ---------------------------------------------------------------------------------------------------------


class UnlearningStep(NamedTuple):
    """Δ = η F⁻¹ ḡ per module (joint layout, float64) and the scale η used."""

    delta: dict[str, torch.Tensor]
    eta: float


def parameter_norm(modules: Mapping[str, nn.Module]) -> float:
    """‖θ‖ over every parameter (weights and biases) of the selected modules together, in float64."""
    return math.sqrt(sum(float(p.detach().double().square().sum()) for p in _params(modules)))


def unlearning_step(
    factors: ekfac.EkfacFactors,
    grad: Mapping[str, torch.Tensor],
    relative_step: float = DEFAULT_RELATIVE_STEP,
    modules: Mapping[str, nn.Module] | None = None,
    damping_factor: float = ekfac.DEFAULT_DAMPING_FACTOR,
) -> UnlearningStep:
    """Δ = η F⁻¹ ḡ with η > 0 such that ‖Δ‖ / ‖θ0‖ = relative_step (norms over all selected parameters).

    Gradient ascent on the query loss: apply as θ′ = θ0 + Δ. `modules` gives θ0 (required; keyword kept
    optional only for argument order). `grad` must cover exactly the modules.
    """
    if modules is None:
        raise ValueError("unlearning_step needs the selected modules to measure ‖θ0‖")
    stacked = {name: g.unsqueeze(0) for name, g in grad.items()}
    return unlearning_steps(factors, stacked, relative_step, modules, damping_factor)[0]


def unlearning_steps(
    factors: ekfac.EkfacFactors,
    grads: Mapping[str, torch.Tensor],
    relative_step: float,
    modules: Mapping[str, nn.Module],
    damping_factor: float = ekfac.DEFAULT_DAMPING_FACTOR,
) -> list[UnlearningStep]:
    """`unlearning_step` of each query of a stack of gradients (q, d_out, d_in [+1]) per module: one
    preconditioning of the whole stack, then each query's own η."""
    if set(grads) != set(modules):
        raise ValueError(f"gradient modules {sorted(grads)} differ from the selected {sorted(modules)}")
    if not relative_step > 0:
        raise ValueError(f"relative_step must be > 0, got {relative_step}")
    direction = ekfac.precondition(factors, {n: g.to(torch.float64) for n, g in grads.items()}, damping_factor)
    norms = torch.stack([d.square().sum(dim=(-1, -2)) for d in direction.values()]).sum(dim=0).sqrt()
    if not bool((norms > 0).all()):
        raise ValueError("F⁻¹ḡ is zero: the query gradient vanishes on the selected modules")
    theta = parameter_norm(modules)
    steps = []
    for row, norm in enumerate(norms.tolist()):
        eta = relative_step * theta / norm
        steps.append(UnlearningStep({name: eta * d[row] for name, d in direction.items()}, eta))
    return steps


def stack_deltas(deltas: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several queries' Δ as one (q, d_out, d_in [+1]) tensor per module, for `first_order_scores_fast`."""
    if not deltas:
        raise ValueError("no deltas to stack")
    return {name: torch.stack([d[name] for d in deltas]) for name in deltas[0]}


# ---------------------------------------------------------------------------------------------------------
# 3. Finite mode
# ---------------------------------------------------------------------------------------------------------


@contextmanager
def applied_step(modules: Mapping[str, nn.Module], delta: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """θ ← θ0 + Δ inside the block; θ0 is restored from saved copies on exit (bit-identical), even on error."""
    saved = [(p, p.detach().clone()) for p in _params(modules)]
    try:
        ekfac.add_to_parameters(modules, delta)
        yield
    finally:
        with torch.no_grad():
            for p, copy in saved:
                p.copy_(copy)


def _scoring_setup(bundle: DiffusionBundle, timesteps: Sequence[int] | None) -> tuple[list[int], list[int]]:
    steps = list(timesteps) if timesteps is not None else scoring_timesteps(20, _num_train_timesteps(bundle))
    return steps, list(range(len(steps)))


def _orientations(images: torch.Tensor, flip: bool) -> list[torch.Tensor]:
    return [images, torch.flip(images, dims=[-1])] if flip else [images]


@torch.no_grad()
def _scoring_losses(
    bundle: DiffusionBundle,
    images: torch.Tensor,
    prompt_states: torch.Tensor,
    item_ids: Sequence[int] | torch.Tensor,
    seed: int,
    timesteps: Sequence[int] | None,
    batch_size: int,
    flip: bool,
) -> torch.Tensor:
    """(n, F) losses on the fixed scoring draws, F = 2 with flip (as is, flipped) else 1; float32, CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = _ids(item_ids)
    if not len(ids) == len(images) == len(prompt_states):
        raise ValueError("images, prompt_states and item_ids need one entry per item")
    steps, indices = _scoring_setup(bundle, timesteps)
    parts = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        views = _orientations(images[start : start + batch_size], flip)
        x0 = torch.cat([model_space(bundle, v) for v in views])
        states = prompt_states[start : start + batch_size].repeat(len(views), 1, 1)
        draws = make_draws(chunk * len(views), indices, seed, bundle.sample_shape, steps, _num_train_timesteps(bundle))
        losses = draw_losses(bundle, x0, states, draws).mean(dim=1).float().cpu()
        parts.append(losses.view(len(views), len(chunk)).T)
    return torch.cat(parts) if parts else torch.empty(0, 2 if flip else 1)


def baseline_losses(
    bundle: DiffusionBundle,
    images: torch.Tensor,
    prompt_states: torch.Tensor,
    item_ids: Sequence[int] | torch.Tensor,
    seed: int,
    timesteps: Sequence[int] | None = None,
    batch_size: int = 32,
    flip: bool = True,
) -> torch.Tensor:
    """L(z, θ0) on the fixed scoring draws, (n, 2) = (as is, flipped) (or (n, 1) without flip), float32.

    Query-independent: compute once per training set and pass to `finite_scores` for every query.
    `timesteps` defaults to `scoring_timesteps()` (0, 50, ..., 950); draw k of item i comes from (seed, i, k).
    """
    return _scoring_losses(bundle, images, prompt_states, item_ids, seed, timesteps, batch_size, flip)


def finite_scores(
    bundle: DiffusionBundle,
    modules: Mapping[str, nn.Module],
    delta: Mapping[str, torch.Tensor],
    images: torch.Tensor,
    prompt_states: torch.Tensor,
    item_ids: Sequence[int] | torch.Tensor,
    seed: int,
    baseline: torch.Tensor,
    timesteps: Sequence[int] | None = None,
    batch_size: int = 32,
    flip: bool = True,
) -> torch.Tensor:
    """τ = max over flips of L(z, θ0 + Δ) − L(z, θ0), shape (n,), on the same draws as `baseline`.

    `baseline` must come from `baseline_losses` with the same items, seed, timesteps and flip setting.
    """
    expected = (len(_ids(item_ids)), 2 if flip else 1)
    if tuple(baseline.shape) != expected:
        raise ValueError(f"baseline has shape {tuple(baseline.shape)}, expected {expected}")
    with applied_step(modules, delta):
        moved = _scoring_losses(bundle, images, prompt_states, item_ids, seed, timesteps, batch_size, flip)
    return (moved - baseline.to(moved)).max(dim=1).values


# ---------------------------------------------------------------------------------------------------------
# 4. First-order mode
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainingSide:
    """Query-independent first-order data: per module and item, G_z for each flip.

    output_grads[name]: (n, F, L, d_out), the gradient of the item's loss (mean over its scoring draws) with
    respect to the module output, summed over draws; F = 2 (as is, flipped) or 1. The module input is the
    item's prompt states (n, L, d_in) for every module in `uses_prompt_states`, stored once; other
    draw-independent modules keep their own input in `inputs[name]` (n, F, L, d_in). `has_bias[name]`: the
    joint layout has a trailing bias column.
    """

    item_ids: list[int]
    prompt_states: torch.Tensor
    output_grads: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    uses_prompt_states: list[str]
    has_bias: dict[str, bool]
    flip: bool
    # (n, F) L(z, θ0) on the same draws: the forward pass that gives G_z gives the baseline losses too.
    losses: torch.Tensor

    def __len__(self) -> int:
        return len(self.item_ids)

    def module_input(self, name: str) -> torch.Tensor:
        """(n, F', L, d_in) with F' = 1 for prompt-state inputs (shared by both flips)."""
        return self.prompt_states.unsqueeze(1) if name in self.uses_prompt_states else self.inputs[name]


def training_side(
    bundle: DiffusionBundle,
    modules: Mapping[str, nn.Module],
    images: torch.Tensor,
    prompt_states: torch.Tensor,
    item_ids: Sequence[int] | torch.Tensor,
    seed: int,
    timesteps: Sequence[int] | None = None,
    batch_size: int = 32,
    flip: bool = True,
    dtype: torch.dtype = torch.float32,
) -> TrainingSide:
    """G_z for every item and flip, one batched forward + backward per batch, on the fixed scoring draws.

    Raises ValueError naming the modules whose input depends on the draw (anything but cross-attention K/V
    in a diffusers UNet): the factorisation ∇W L(z) = G_zᵀ A_z does not hold for them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = _ids(item_ids)
    if not len(ids) == len(images) == len(prompt_states):
        raise ValueError("images, prompt_states and item_ids need one entry per item")
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            raise ValueError(f"first-order fast path needs Linear modules with draw-independent input; {name} is not")
    steps, indices = _scoring_setup(bundle, timesteps)
    n_views, n_draws = (2 if flip else 1), len(indices)
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    prompt_input = {name: True for name in modules}
    seen: list[torch.Tensor] = []  # per batch, (items, views) losses from loss_fn
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        b = len(chunk)
        batch_states = prompt_states[start : start + b]
        views = _orientations(images[start : start + b], flip)
        x0 = torch.cat([model_space(bundle, v) for v in views])
        states = batch_states.repeat(n_views, 1, 1)
        draws = make_draws(chunk * n_views, indices, seed, bundle.sample_shape, steps, _num_train_timesteps(bundle))

        def loss_fn(_: object, x0=x0, states=states, draws=draws) -> torch.Tensor:
            per_item = draw_losses(bundle, x0, states, draws).mean(dim=1)
            seen.append(per_item.detach().float().cpu().view(n_views, -1).T)
            return per_item

        n, calls = ekfac._forward_backward(modules, loss_fn, None)
        batch_grads: dict[str, torch.Tensor] = {}
        batch_inputs: dict[str, torch.Tensor] = {}
        varying = []
        for name, inp, grad in calls:
            # Rows are item-major: (views x items) x draws; tokens next.
            a = inp.reshape(n, n_draws, -1, inp.shape[-1])
            if not torch.equal(a, a[:, :1].expand_as(a)):
                varying.append(name)
                continue
            g = grad.reshape(n, n_draws, -1, grad.shape[-1]).to(dtype).sum(dim=1)
            if name in batch_grads:  # a module called several times per forward: its input must repeat too
                if not torch.equal(batch_inputs[name], a[:, 0]):
                    varying.append(name)
                batch_grads[name] = batch_grads[name] + g
            else:
                batch_grads[name], batch_inputs[name] = g, a[:, 0]
        if varying:
            raise ValueError(
                "the first-order fast path needs module inputs that do not depend on the draw; these vary: "
                + ", ".join(sorted(set(varying)))
                + " (use gda.ekfac.first_order_scores with per-item gradients instead)"
            )
        for name in modules:
            if name not in batch_grads:
                raise RuntimeError(f"{name} was not called by the UNet")
            # (views x items, L, d) -> (items, views, L, d)
            g = batch_grads[name].reshape(n_views, b, *batch_grads[name].shape[1:]).transpose(0, 1)
            a = batch_inputs[name].reshape(n_views, b, *batch_inputs[name].shape[1:]).transpose(0, 1)
            grads[name].append(g.cpu())
            ref = batch_states.to(a.device, a.dtype).unsqueeze(1).expand_as(a)
            if prompt_input[name] and torch.equal(a, ref):
                inputs[name].append(a[:, :1].to(dtype).cpu())  # kept only in case a later batch differs
            else:
                prompt_input[name] = False
                inputs[name].append(a.to(dtype).cpu())
    uses_prompt = [name for name in modules if prompt_input[name]]
    kept_inputs = {}
    for name in modules:
        if name not in uses_prompt:
            kept_inputs[name] = torch.cat([x.expand(-1, n_views, -1, -1) for x in inputs[name]])
    return TrainingSide(
        item_ids=ids,
        prompt_states=prompt_states.to("cpu", dtype),
        output_grads={name: torch.cat(parts) for name, parts in grads.items()},
        inputs=kept_inputs,
        uses_prompt_states=uses_prompt,
        has_bias={name: module.bias is not None for name, module in modules.items()},
        flip=flip,
        losses=torch.cat(seen) if seen else torch.empty(0, n_views),
    )


def first_order_scores_fast(
    side: TrainingSide, delta: Mapping[str, torch.Tensor], chunk_elements: int = 2**24
) -> torch.Tensor:
    """τ ≈ max over flips of Σ_modules ⟨G_zᵀ A_z, Δ⟩, with each chunk's per-item gradients G_zᵀ A_z formed
    once and contracted with every query's Δ in one matmul: q queries cost one pass over the items, not q.

    `delta` per module: (d_out, d_in [+1]) for one query -> scores (n,), or (q, d_out, d_in [+1]) -> (q, n).
    Per-item gradients in the training side's dtype, their contraction with Δ in float64; items are
    processed in chunks of about `chunk_elements` per-item gradient entries.
    """
    missing = set(side.output_grads) - set(delta)
    if missing or set(delta) - set(side.output_grads):
        raise ValueError(f"delta modules {sorted(delta)} differ from the training side's {sorted(side.output_grads)}")
    single = next(iter(delta.values())).dim() == 2
    n, n_views = len(side), (2 if side.flip else 1)
    q = 1 if single else next(iter(delta.values())).shape[0]
    total = torch.zeros(q, n, n_views, dtype=torch.float64)
    for name, g_all in side.output_grads.items():
        d = delta[name].to(torch.float64)
        d = d.unsqueeze(0) if single else d
        weight, bias = (d[..., :-1], d[..., -1]) if side.has_bias[name] else (d, None)
        a_all = side.module_input(name)
        step = max(1, chunk_elements // (n_views * weight[0].numel()))
        for s in range(0, n, step):
            g = g_all[s : s + step]  # (c, F, L, o)
            a = a_all[s : s + step].expand(-1, n_views, -1, -1)  # (c, F, L, i): prompt states serve both flips
            # The contraction with Δ is in float64: it cancels heavily, and in float32 a query's score would
            # then depend on how many queries share the matmul (its blocking) at about 1e-5 of the largest.
            item_grads = torch.einsum("cflo,cfli->cfoi", g, a).double()
            part = torch.einsum("cfoi,qoi->qcf", item_grads, weight)
            if bias is not None:
                part = part + torch.einsum("cfo,qo->qcf", g.sum(dim=2).double(), bias)
            total[:, s : s + step] += part
    scores = total.max(dim=2).values
    return scores[0] if single else scores


# ---------------------------------------------------------------------------------------------------------
# 5. Ranking
# ---------------------------------------------------------------------------------------------------------


def rank_scores(scores: torch.Tensor, item_ids: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Rank of every item, 0 = most influential (highest τ); ties by ascending train id (default: position).

    `scores` (n,) -> ranks (n,) int64, or (q, n) -> (q, n) ranked per query.
    """
    values = scores.detach().to("cpu", torch.float64).numpy()
    ids = np.arange(values.shape[-1]) if item_ids is None else np.asarray(_ids(item_ids))
    if ids.shape[0] != values.shape[-1]:
        raise ValueError(f"{ids.shape[0]} item ids for {values.shape[-1]} scores")
    rows = values.reshape(-1, values.shape[-1])
    ranks = np.empty(rows.shape, dtype=np.int64)
    for r, row in enumerate(rows):
        order = np.lexsort((ids, -row))  # last key is primary: highest score first, then lowest id
        ranks[r, order] = np.arange(row.shape[0])
    return torch.from_numpy(ranks.reshape(values.shape))


__all__ = [
    "DEFAULT_RELATIVE_STEP",
    "TrainingSide",
    "UnlearningStep",
    "applied_step",
    "baseline_losses",
    "finite_scores",
    "first_order_scores_fast",
    "parameter_norm",
    "query_gradient",
    "query_gradients",
    "rank_scores",
    "stack_deltas",
    "training_side",
    "unlearning_step",
    "unlearning_steps",
]


def select_items(side: TrainingSide, item_ids: Sequence[int]) -> TrainingSide:
    """The rows of ``side`` for ``item_ids``, in that order (every id must be present)."""
    position = {item: row for row, item in enumerate(side.item_ids)}
    missing = [item for item in item_ids if item not in position]
    if missing:
        raise KeyError(f"{len(missing)} items have no training-side gradients (first: {missing[0]}); materialize them")
    rows = torch.tensor([position[item] for item in item_ids], dtype=torch.long)
    return TrainingSide(
        item_ids=list(item_ids),
        prompt_states=side.prompt_states[rows],
        output_grads={name: grads[rows] for name, grads in side.output_grads.items()},
        inputs={name: values[rows] for name, values in side.inputs.items()},
        uses_prompt_states=side.uses_prompt_states,
        has_bias=side.has_bias,
        flip=side.flip,
        losses=side.losses[rows],
    )


def concat_sides(sides: Sequence[TrainingSide]) -> TrainingSide:
    """One training side from several (e.g. one per shard) computed for the same modules."""
    first = sides[0]
    return TrainingSide(
        item_ids=[item for side in sides for item in side.item_ids],
        prompt_states=torch.cat([side.prompt_states for side in sides]),
        output_grads={name: torch.cat([side.output_grads[name] for side in sides]) for name in first.output_grads},
        inputs={name: torch.cat([side.inputs[name] for side in sides]) for name in first.inputs},
        uses_prompt_states=first.uses_prompt_states,
        has_bias=first.has_bias,
        flip=first.flip,
        losses=torch.cat([side.losses for side in sides]),
    )


def save_training_side(path: Path, side: TrainingSide, provenance: Mapping[str, str] | None = None) -> None:
    """One safetensors file (temp name, then rename); layout facts go in its metadata, with ``provenance``
    (what made it: model version, seed, timesteps) under ``provenance/``."""
    tensors = {
        "item_ids": torch.tensor(side.item_ids, dtype=torch.int64),
        "prompt_states": side.prompt_states.contiguous(),
        "losses": side.losses.contiguous(),
    }
    tensors |= {f"grad/{name}": value.contiguous() for name, value in side.output_grads.items()}
    tensors |= {f"input/{name}": value.contiguous() for name, value in side.inputs.items()}
    metadata = {
        "modules": json.dumps(list(side.output_grads)),
        "uses_prompt_states": json.dumps(side.uses_prompt_states),
        "has_bias": json.dumps(side.has_bias),
        "flip": json.dumps(side.flip),
    } | {f"provenance/{key}": value for key, value in (provenance or {}).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_training_side(path: Path) -> TrainingSide:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    modules = json.loads(metadata["modules"])
    return TrainingSide(
        item_ids=tensors["item_ids"].tolist(),
        prompt_states=tensors["prompt_states"],
        output_grads={name: tensors[f"grad/{name}"] for name in modules},
        inputs={name[len("input/") :]: value for name, value in tensors.items() if name.startswith("input/")},
        uses_prompt_states=json.loads(metadata["uses_prompt_states"]),
        has_bias=json.loads(metadata["has_bias"]),
        flip=json.loads(metadata["flip"]),
        losses=tensors["losses"],
    )


def stored_losses(path: Path) -> tuple[list[int], torch.Tensor, dict[str, str]]:
    """(item ids, (n, F) baseline losses, provenance) of a saved training side, without its gradients."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        provenance = {k[len("provenance/") :]: v for k, v in metadata.items() if k.startswith("provenance/")}
        return handle.get_tensor("item_ids").tolist(), handle.get_tensor("losses"), provenance

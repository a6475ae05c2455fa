"""EK-FAC for the AbU+ teacher: factors, damped inverse products, first-order scores. Plain PyTorch.

The Fisher is the empirical Fisher of *items*: an item is one training example with its fixed draws, its
loss is the per-item loss (mean over its draws), and a batch's backward pass uses the sum of the per-item
losses, so every row's output gradient belongs to exactly one item.

Per selected module (nn.Linear or nn.Conv2d), with a = the module input row (a token, or an unfolded conv
patch as kronfluence extracts it) with a trailing 1 when the module has a bias, and g = the gradient of the
item's loss with respect to the module output row:

- A = E_rows[a aᵀ], G = E_rows[g gᵀ] (float64 sums over every token / conv position),
- Q_A, Q_G = float64 `torch.linalg.eigh` eigenbases of the symmetrised A and G,
- Λ = mean over items of (Q_Gᵀ ∇W_n Q_A)², where ∇W_n = Σ_rows of item n of g aᵀ is the item's gradient
  in the joint (d_out, d_in [+1]) layout, computed from hooks in one batched backward per batch,
- the damped inverse product Q_G [(Q_Gᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ with λ = damping_factor × mean(Λ) (0.1 by
  default, kronfluence's heuristic when its `damping_factor=None`) or an absolute `damping`.

Gradients are matrices in kronfluence's joint layout: (d_out, d_in) for a Linear, (C_out, C_in·k1·k2) for a
Conv2d (the flattened weight), with the bias as the last column when there is one. `gradient_matrix`,
`split_matrix`, `module_gradients` and `add_to_parameters` convert between that layout and parameters.

Factors are stored exactly as kronfluence 1.0.1 stores them in a `factors_<name>/` folder: one safetensors
file per factor name (keys = module names as in `model.named_modules()`), covariance and Lambda as raw sums
next to their int64 counts, plus `factor_arguments.json`. Factors fitted with kronfluence load directly, and
kronfluence scores with factors written here.

Unlike kronfluence (whose per-sample gradient assumes one module call per item and one row block per item),
an item may own several consecutive rows of a module's leading (batch) dimension, e.g. its draws, and a
module may be called several times per forward (shared parameters): per-item gradients are summed over both.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

Which = Literal["kv", "cross_attention", "attention", "all"]
LossFn = Callable[[Any], torch.Tensor]
"""A batch -> per-item losses, shape (n,). Each item's rows must be consecutive in every module's leading
dimension (item-major), as `draw_losses` lays out items x draws."""

# kronfluence 1.0.1 names (kronfluence/utils/constants.py); each is a `<name>.safetensors` file.
COVARIANCE_NAMES = (
    "activation_covariance",
    "gradient_covariance",
    "num_activation_covariance_processed",
    "num_gradient_covariance_processed",
)
EIGEN_NAMES = ("activation_eigenvectors", "activation_eigenvalues", "gradient_eigenvectors", "gradient_eigenvalues")
LAMBDA_NAMES = ("lambda_matrix", "num_lambda_processed")
FACTOR_NAMES = COVARIANCE_NAMES + EIGEN_NAMES + LAMBDA_NAMES
FACTOR_ARGUMENTS_FILE = "factor_arguments.json"
DEFAULT_DAMPING_FACTOR = 0.1  # kronfluence's HEURISTIC_DAMPING_SCALE


# ---------------------------------------------------------------------------------------------------------
# Module selection and the joint gradient layout
# ---------------------------------------------------------------------------------------------------------


def select_modules(model: nn.Module, which: Which = "kv") -> OrderedDict[str, nn.Module]:
    """Modules whose weights EK-FAC preconditions, by `model.named_modules()` name, in model order.

    kv: cross-attention key/value projections (`attn2.to_k`, `attn2.to_v`); cross_attention: every Linear
    inside an `attn2`; attention: every Linear inside an `attn1` or `attn2`; all: every Linear and Conv2d.
    """
    if which not in ("kv", "cross_attention", "attention", "all"):
        raise ValueError(f"which must be 'kv', 'cross_attention', 'attention' or 'all', got {which!r}")
    chosen: OrderedDict[str, nn.Module] = OrderedDict()
    for name, module in model.named_modules():
        parts = name.split(".")
        if which == "all":
            keep = isinstance(module, nn.Linear | nn.Conv2d)
        elif which == "kv":
            keep = isinstance(module, nn.Linear) and parts[-2:] in (["attn2", "to_k"], ["attn2", "to_v"])
        else:
            blocks = ("attn2",) if which == "cross_attention" else ("attn1", "attn2")
            keep = isinstance(module, nn.Linear) and any(p in blocks for p in parts[:-1])
        if keep:
            _check_supported(name, module)
            chosen[name] = module
    if not chosen:
        raise ValueError(f"no {which!r} modules found in {type(model).__name__}")
    return chosen


def _check_supported(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"{name}: only Conv2d with groups=1, zero padding and integer padding is supported")
    elif not isinstance(module, nn.Linear):
        raise TypeError(f"{name}: EK-FAC supports nn.Linear and nn.Conv2d, got {type(module).__name__}")


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in [+1 for the bias]) of the module's joint gradient matrix."""
    weight = module.weight
    return weight.shape[0], weight[0].numel() + (module.bias is not None)


def gradient_matrix(
    module: nn.Module, weight_grad: torch.Tensor | None = None, bias_grad: torch.Tensor | None = None
) -> torch.Tensor:
    """A weight (and bias) gradient as one (d_out, d_in [+1]) matrix; defaults to the parameters' `.grad`."""
    if weight_grad is None:
        weight_grad = module.weight.grad
        bias_grad = module.bias.grad if module.bias is not None else None
        if weight_grad is None:
            raise ValueError("the module's weight has no .grad")
    matrix = weight_grad.reshape(weight_grad.shape[0], -1)
    if module.bias is not None:
        bias = matrix.new_zeros(matrix.shape[0]) if bias_grad is None else bias_grad
        matrix = torch.cat([matrix, bias.reshape(-1, 1).to(matrix)], dim=1)
    return matrix


def split_matrix(module: nn.Module, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The inverse of `gradient_matrix`: (weight-shaped tensor, bias-shaped tensor or None)."""
    if tuple(matrix.shape) != matrix_shape(module):
        raise ValueError(f"matrix {tuple(matrix.shape)} does not match the module's {matrix_shape(module)}")
    if module.bias is None:
        return matrix.reshape(module.weight.shape), None
    return matrix[:, :-1].reshape(module.weight.shape), matrix[:, -1].clone()


def module_gradients(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every module's current `.grad` in the joint layout."""
    return {name: gradient_matrix(module) for name, module in modules.items()}


@torch.no_grad()
def add_to_parameters(modules: Mapping[str, nn.Module], deltas: Mapping[str, torch.Tensor], scale: float = 1.0) -> None:
    """θ ← θ + scale · Δ in place, for joint-layout deltas (e.g. an AbU+ step η F⁻¹ ḡ)."""
    for name, delta in deltas.items():
        module = modules[name]
        weight, bias = split_matrix(module, delta)
        module.weight.add_(weight.to(module.weight), alpha=scale)
        if bias is not None:
            module.bias.add_(bias.to(module.bias), alpha=scale)


# ---------------------------------------------------------------------------------------------------------
# Hooks: module inputs (as rows) and output gradients
# ---------------------------------------------------------------------------------------------------------


def _activation_rows(module: nn.Module, inputs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, P, d_in [+1]): P rows (tokens / conv output positions) per leading index."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(
            inputs, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        )
        rows = patches.transpose(1, 2)
    else:
        rows = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    rows = rows.to(dtype)
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], dim=2)
    return rows


def _gradient_rows(module: nn.Module, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, P, d_out), rows in the same order as `_activation_rows`."""
    if isinstance(module, nn.Conv2d):
        rows = grad.reshape(grad.shape[0], grad.shape[1], -1).transpose(1, 2)
    else:
        rows = grad.reshape(grad.shape[0], -1, grad.shape[-1])
    return rows.to(dtype)


class _Capture:
    """Records (module name, input, output) of every call of the selected modules during a forward."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = modules
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _Capture:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:
                raise RuntimeError(f"{name}: output does not require grad (is autograd disabled?)")
            self.calls.append((name, inputs[0].detach(), output))

        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextmanager
def _weights_require_grad(modules: Mapping[str, nn.Module]) -> Iterator[None]:
    params = [p for m in modules.values() for p in m.parameters(recurse=False)]
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


def _forward_backward(
    modules: Mapping[str, nn.Module], loss_fn: LossFn, batch: Any
) -> tuple[int, list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """One forward of the per-item losses and one backward of their sum; (n items, [(name, input, dL/dout)])."""
    with _weights_require_grad(modules), _Capture(modules) as capture:
        losses = loss_fn(batch)
        if losses.dim() != 1:
            raise ValueError(f"loss_fn must return per-item losses of shape (n,), got {tuple(losses.shape)}")
        if not capture.calls:
            raise RuntimeError("none of the selected modules was called by loss_fn")
        outputs = [out for _, _, out in capture.calls]
        grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
    calls = []
    for (name, inputs, out), grad in zip(capture.calls, grads, strict=True):
        calls.append((name, inputs, torch.zeros_like(out) if grad is None else grad.detach()))
    return losses.shape[0], calls


def _per_item(rows: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """(B, P, d) -> (n, B/n * P, d): rows of consecutive leading indices belong to one item."""
    if rows.shape[0] % n:
        raise ValueError(f"{name}: leading dimension {rows.shape[0]} is not a multiple of the {n} items")
    return rows.reshape(n, -1, rows.shape[-1])


def per_item_gradients(
    modules: Mapping[str, nn.Module], loss_fn: LossFn, batch: Any, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """Each item's loss gradient, (n, d_out, d_in [+1]) per module, from one batched backward.

    Summed over the item's rows (draws, tokens, positions) and over repeated calls of a module.
    """
    n, calls = _forward_backward(modules, loss_fn, batch)
    out: dict[str, torch.Tensor] = {}
    for name, inputs, grad in calls:
        module = modules[name]
        a = _per_item(_activation_rows(module, inputs, dtype), n, name)
        g = _per_item(_gradient_rows(module, grad, dtype), n, name)
        item_grad = torch.einsum("npo,npi->noi", g, a)
        out[name] = out[name] + item_grad if name in out else item_grad
    return out


# ---------------------------------------------------------------------------------------------------------
# Factors
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModuleFactors:
    """One module's factors under kronfluence's names: covariances and Lambda are raw sums with counts."""

    activation_covariance: torch.Tensor | None = None
    gradient_covariance: torch.Tensor | None = None
    num_activation_covariance_processed: torch.Tensor | None = None
    num_gradient_covariance_processed: torch.Tensor | None = None
    activation_eigenvectors: torch.Tensor | None = None
    activation_eigenvalues: torch.Tensor | None = None
    gradient_eigenvectors: torch.Tensor | None = None
    gradient_eigenvalues: torch.Tensor | None = None
    lambda_matrix: torch.Tensor | None = None
    num_lambda_processed: torch.Tensor | None = None

    def activation_covariance_mean(self) -> torch.Tensor:
        """A = E[a aᵀ] (float64)."""
        return _mean(self.activation_covariance, self.num_activation_covariance_processed, "activation_covariance")

    def gradient_covariance_mean(self) -> torch.Tensor:
        """G = E[g gᵀ] (float64)."""
        return _mean(self.gradient_covariance, self.num_gradient_covariance_processed, "gradient_covariance")

    def corrected_eigenvalues(self) -> torch.Tensor:
        """Λ = mean over items of (Q_Gᵀ ∇W_n Q_A)², shape (d_out, d_in [+1]) (float64)."""
        return _mean(self.lambda_matrix, self.num_lambda_processed, "lambda_matrix")


def _mean(total: torch.Tensor | None, count: torch.Tensor | None, what: str) -> torch.Tensor:
    if total is None or count is None:
        raise ValueError(f"{what} has not been fitted")
    return total.to(torch.float64) / count.to(torch.float64)


@dataclass
class EkfacFactors:
    """Factors for every module, by module name (the selection's order)."""

    modules: dict[str, ModuleFactors] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ModuleFactors:
        return self.modules[name]

    def names(self) -> list[str]:
        return list(self.modules)


def fit_covariances(
    modules: Mapping[str, nn.Module], loss_fn: LossFn, batches: Iterable[Any], factors: EkfacFactors | None = None
) -> EkfacFactors:
    """First pass: accumulate A and G (float64 raw sums and row counts) over all batches."""
    factors = factors if factors is not None else EkfacFactors()
    for name in modules:
        factors.modules.setdefault(name, ModuleFactors())
    for batch in batches:
        _, calls = _forward_backward(modules, loss_fn, batch)
        for name, inputs, grad in calls:
            module, mf = modules[name], factors.modules[name]
            a = _activation_rows(module, inputs, torch.float64).reshape(-1, matrix_shape(module)[1])
            g = _gradient_rows(module, grad, torch.float64).reshape(-1, matrix_shape(module)[0])
            mf.activation_covariance = _accumulate(mf.activation_covariance, a.T @ a)
            mf.gradient_covariance = _accumulate(mf.gradient_covariance, g.T @ g)
            mf.num_activation_covariance_processed = _count(mf.num_activation_covariance_processed, a.shape[0])
            mf.num_gradient_covariance_processed = _count(mf.num_gradient_covariance_processed, g.shape[0])
    return factors


def _accumulate(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    value = value.detach().to("cpu", torch.float64)
    return value if total is None else total + value


def _count(total: torch.Tensor | None, value: int) -> torch.Tensor:
    value_t = torch.tensor([value], dtype=torch.int64)
    return value_t if total is None else total + value_t


def eigendecompose(factors: EkfacFactors) -> EkfacFactors:
    """Eigenbases of the normalised, symmetrised A and G with float64 `eigh` (as kronfluence does)."""
    for mf in factors.modules.values():
        for prefix, mean in (("activation", mf.activation_covariance_mean), ("gradient", mf.gradient_covariance_mean)):
            matrix = mean()
            values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
            setattr(mf, f"{prefix}_eigenvalues", values.contiguous())
            setattr(mf, f"{prefix}_eigenvectors", vectors.contiguous())
    return factors


def fit_lambda(
    modules: Mapping[str, nn.Module], loss_fn: LossFn, batches: Iterable[Any], factors: EkfacFactors
) -> EkfacFactors:
    """Second pass: Λ sums of (Q_Gᵀ ∇W_n Q_A)² over items, with per-item gradients from hooks."""
    bases = {}
    for name in modules:
        mf = factors.modules[name]
        if mf.activation_eigenvectors is None or mf.gradient_eigenvectors is None:
            raise ValueError(f"{name}: eigendecompose before fitting Lambda")
        bases[name] = (mf.gradient_eigenvectors.to(torch.float64), mf.activation_eigenvectors.to(torch.float64))
        mf.lambda_matrix, mf.num_lambda_processed = None, None
    for batch in batches:
        grads = per_item_gradients(modules, loss_fn, batch)
        for name, item_grads in grads.items():
            q_g, q_a = (q.to(item_grads.device) for q in bases[name])
            rotated = (q_g.T @ item_grads @ q_a).square().sum(dim=0)
            mf = factors.modules[name]
            mf.lambda_matrix = _accumulate(mf.lambda_matrix, rotated)
            mf.num_lambda_processed = _count(mf.num_lambda_processed, item_grads.shape[0])
    return factors


def fit_ekfac(modules: Mapping[str, nn.Module], loss_fn: LossFn, batches: Iterable[Any]) -> EkfacFactors:
    """Covariances, eigenbases, then eigenvalue correction. `batches` is iterated twice (re-iterable)."""
    if iter(batches) is batches:
        raise TypeError("batches must be re-iterable (a list or an object with __iter__), not an iterator")
    factors = fit_covariances(modules, loss_fn, batches)
    eigendecompose(factors)
    return fit_lambda(modules, loss_fn, batches, factors)


# ---------------------------------------------------------------------------------------------------------
# Damped inverse products and first-order scores
# ---------------------------------------------------------------------------------------------------------


def damping_value(
    module_factors: ModuleFactors, damping_factor: float = DEFAULT_DAMPING_FACTOR, damping: float | None = None
) -> float:
    """λ for a module: `damping` if given (absolute), else damping_factor × mean(Λ)."""
    if damping is not None:
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        return float(damping)
    if damping_factor < 0:
        raise ValueError(f"damping_factor must be >= 0, got {damping_factor}")
    return float(damping_factor * module_factors.corrected_eigenvalues().mean())


def precondition(
    factors: EkfacFactors,
    grads: Mapping[str, torch.Tensor],
    damping_factor: float = DEFAULT_DAMPING_FACTOR,
    damping: float | None = None,
) -> dict[str, torch.Tensor]:
    """Q_G [(Q_Gᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ per module, computed in float64, returned in V's dtype.

    V is a joint-layout matrix (d_out, d_in [+1]) or a stack of them (..., d_out, d_in [+1]).
    """
    out = {}
    for name, v in grads.items():
        mf = factors.modules[name]
        q_g = mf.gradient_eigenvectors.to(v.device, torch.float64)
        q_a = mf.activation_eigenvectors.to(v.device, torch.float64)
        lam = mf.corrected_eigenvalues().to(v.device)
        if v.shape[-2:] != lam.shape:
            raise ValueError(f"{name}: gradient {tuple(v.shape)} does not match the factors' {tuple(lam.shape)}")
        rotated = q_g.T @ v.to(torch.float64) @ q_a
        rotated = rotated / (lam + damping_value(mf, damping_factor, damping))
        out[name] = (q_g @ rotated @ q_a.T).to(v.dtype)
    return out


def fisher_vector_product(factors: EkfacFactors, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The undamped EK-FAC Fisher applied to V: Q_G [(Q_Gᵀ V Q_A) ⊙ Λ] Q_Aᵀ (float64 inside)."""
    out = {}
    for name, v in grads.items():
        mf = factors.modules[name]
        q_g = mf.gradient_eigenvectors.to(v.device, torch.float64)
        q_a = mf.activation_eigenvectors.to(v.device, torch.float64)
        rotated = (q_g.T @ v.to(torch.float64) @ q_a) * mf.corrected_eigenvalues().to(v.device)
        out[name] = (q_g @ rotated @ q_a.T).to(v.dtype)
    return out


def first_order_scores(
    modules: Mapping[str, nn.Module], loss_fn: LossFn, batches: Iterable[Any], directions: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """⟨∇L(z_n), D_q⟩ summed over modules, shape (items, q), for directions (q, d_out, d_in [+1]) per module.

    With D = F⁻¹ ḡ (`precondition` of query gradients) this is the first-order AbU+ score divided by η, and
    kronfluence's pairwise influence score.
    """
    parts = []
    for batch in batches:
        grads = per_item_gradients(modules, loss_fn, batch)
        total = None
        for name, item_grads in grads.items():
            d = directions[name].to(item_grads.device, torch.float64)
            score = torch.einsum("noi,qoi->nq", item_grads, d)
            total = score if total is None else total + score
        parts.append(total.cpu())
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------------------
# kronfluence's safetensors layout
# ---------------------------------------------------------------------------------------------------------


def save_factors(
    factors: EkfacFactors,
    directory: str | Path,
    dtype: torch.dtype | None = None,
    factor_arguments: Mapping[str, Any] | None = None,
) -> Path:
    """Write `directory/<factor name>.safetensors` (keys = module names) and `factor_arguments.json`.

    This is kronfluence's `<output_dir>/<analysis>/factors_<name>/` folder: point an Analyzer at it to score
    with these factors. Floating factors are written in `dtype` (default: as held, float64).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for factor_name in FACTOR_NAMES:
        tensors = {}
        for name, mf in factors.modules.items():
            value = getattr(mf, factor_name)
            if value is None:
                continue
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            tensors[name] = value.detach().cpu().contiguous()
        if tensors:
            if len(tensors) != len(factors.modules):
                raise ValueError(f"{factor_name} is missing for some modules")
            # safetensors sorts keys; the metadata keeps the selection's (model) order.
            metadata = {"writer": "gda.ekfac", "module_order": json.dumps(list(factors.modules))}
            save_file(tensors, str(directory / f"{factor_name}.safetensors"), metadata=metadata)
    arguments = {"strategy": "ekfac", "use_empirical_fisher": True}
    arguments.update(factor_arguments or {})
    (directory / FACTOR_ARGUMENTS_FILE).write_text(json.dumps(arguments, indent=4))
    return directory


def load_factors(directory: str | Path, module_names: Sequence[str] | None = None) -> EkfacFactors:
    """Read factors in kronfluence's layout (ours or kronfluence's). Floating tensors become float64.

    Module order: `module_names` if given, else the order saved by `save_factors`, else sorted names. Needs at least
    the eigendecomposition and Lambda files; covariance files are read when present.
    """
    directory = Path(directory)
    for factor_name in EIGEN_NAMES + LAMBDA_NAMES:
        if not (directory / f"{factor_name}.safetensors").is_file():
            raise FileNotFoundError(f"{directory} has no {factor_name}.safetensors")
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    order: list[str] | None = None
    for factor_name in FACTOR_NAMES:
        path = directory / f"{factor_name}.safetensors"
        if path.is_file():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                loaded[factor_name] = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
                if factor_name == "lambda_matrix" and "module_order" in (f.metadata() or {}):
                    order = json.loads(f.metadata()["module_order"])
    if module_names is not None:
        names = list(module_names)
    elif order is not None and set(order) == set(loaded["lambda_matrix"]):
        names = order
    else:  # kronfluence's files: the keys in file (sorted) order
        names = list(loaded["lambda_matrix"])
    factors = EkfacFactors()
    for name in names:
        mf = ModuleFactors()
        for factor_name, tensors in loaded.items():
            if name not in tensors:
                raise KeyError(f"{factor_name}.safetensors in {directory} has no module {name!r}")
            value = tensors[name]
            setattr(mf, factor_name, value.to(torch.float64) if value.is_floating_point() else value.to(torch.int64))
        factors.modules[name] = mf
    return factors


# ---------------------------------------------------------------------------------------------------------
# Diffusion items: (training image, fixed draws)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffusionBatch:
    """A chunk of items: model-space x0 (n, C, H, W), prompt states (n, L, D), item ids, draw indices."""

    x0: torch.Tensor
    prompt_states: torch.Tensor
    item_ids: tuple[int, ...]


@dataclass
class DiffusionItems:
    """Re-iterable batches of diffusion items; the draws of an item come from (seed, item id, draw index).

    `images_or_latents` are RGB in [-1, 1] (VAE-encoded per batch when the bundle has a VAE) or model-space
    inputs. `loss_fn` gives each item's loss = mean over its draws of `draw_losses`.
    """

    bundle: Any
    images_or_latents: torch.Tensor
    prompt_states: torch.Tensor
    item_ids: Sequence[int]
    draw_indices: Sequence[int]
    seed: int
    timesteps: Sequence[int] | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        ids = self.item_ids.tolist() if isinstance(self.item_ids, torch.Tensor) else self.item_ids
        self.item_ids = [int(i) for i in ids]
        if not len(self.item_ids) == len(self.images_or_latents) == len(self.prompt_states):
            raise ValueError("images_or_latents, prompt_states and item_ids need one entry per item")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def __len__(self) -> int:
        return (len(self.item_ids) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[DiffusionBatch]:
        from gda.diffusion.loss import model_space

        for start in range(0, len(self.item_ids), self.batch_size):
            stop = start + self.batch_size
            x0 = model_space(self.bundle, self.images_or_latents[start:stop])
            yield DiffusionBatch(x0, self.prompt_states[start:stop], tuple(self.item_ids[start:stop]))

    def loss_fn(self, batch: DiffusionBatch) -> torch.Tensor:
        from gda.diffusion.loss import draw_losses, make_draws

        scheduler = self.bundle.scheduler
        draws = make_draws(
            batch.item_ids,
            self.draw_indices,
            self.seed,
            self.bundle.sample_shape,
            self.timesteps,
            scheduler.config.num_train_timesteps,
        )
        return draw_losses(self.bundle, batch.x0, batch.prompt_states, draws).mean(dim=1)


def fit_diffusion_factors(items: DiffusionItems, which: Which | Mapping[str, nn.Module] = "kv") -> EkfacFactors:
    """EK-FAC of the bundle's UNet over diffusion items (a module selection name or explicit modules)."""
    modules = select_modules(items.bundle.unet, which) if isinstance(which, str) else which
    return fit_ekfac(modules, items.loss_fn, items)


__all__ = [
    "DEFAULT_DAMPING_FACTOR",
    "FACTOR_NAMES",
    "DiffusionBatch",
    "DiffusionItems",
    "EkfacFactors",
    "ModuleFactors",
    "add_to_parameters",
    "damping_value",
    "eigendecompose",
    "first_order_scores",
    "fisher_vector_product",
    "fit_covariances",
    "fit_diffusion_factors",
    "fit_ekfac",
    "fit_lambda",
    "gradient_matrix",
    "load_factors",
    "matrix_shape",
    "module_gradients",
    "per_item_gradients",
    "precondition",
    "save_factors",
    "select_modules",
    "split_matrix",
]

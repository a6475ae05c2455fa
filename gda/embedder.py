"""The distilled attribution embedder: one MLP g shared by queries and training images, trained so that
s · cos(g(φq), g(φz)) + b predicts the teacher's rank label, then used as a plain inner-product search.

φ = concat(image feature, text feature); with `normalise_parts` each part is L2-normalised first, because raw
DINO features are larger and dominated the concatenation in a prototype (method.md). The label is a rank
(0 = most influential), so a higher logit means *less* influential and the learned s turns negative: queries
are embedded as -sign(s) · normalize(g(φ)) and training images as normalize(g(φ)), so that the largest inner
product is the most influential whatever sign s takes. A prototype that ignored this scored below random.

Saved as `model.safetensors` + `config.json`; the config carries a version, the first 12 hex digits of the
weight file's sha256, which loading checks against the weights beside it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from gda.ranking import PairRows, epoch_batches
from gda.retrieval_metrics import map_at

if TYPE_CHECKING:
    from gda.encoders import EncoderSpec
    from gda.encoders.runtime import Network

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EMBED_BATCH = 65_536  # rows per no-grad forward when embedding: bounds memory, not results
# bce: the paper's BCE on the soft rank label; mse: squared error of sigmoid(logit) against it; pairwise:
# RankNet's logistic loss on every two rows of one query in a batch, the more influential ranked first.
LOSSES = ("bce", "mse", "pairwise")


@dataclass(frozen=True)
class EmbedderConfig:
    input_dim: int
    image_dim: int  # the first image_dim features are the image part, the rest the text part
    widths: tuple[int, ...] = (768, 768, 768, 768)  # hidden widths, then the output width
    dropout: float = 0.1
    normalise_parts: bool = True
    init_scale: float = -1.0  # s starts negative: the label is a rank; with +1 it learned slowly (method.md)
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 4096
    epochs: int = 10
    seed: int = 0
    loss: str = "bce"  # one of LOSSES
    keep_best_epoch: bool = False  # keep the weights of the epoch with the best validation mAP (needs val)

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0 < self.image_dim < self.input_dim:
            raise ValueError(f"need 0 < image_dim < input_dim, got {self.image_dim} and {self.input_dim}")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be positive and end with the output width, got {self.widths}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, values: Mapping) -> EmbedderConfig:
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown embedder config keys {sorted(unknown)}")
        return cls(**values)


class Embedder(nn.Module):
    """g (Linear → ReLU → Dropout per hidden width, then Linear to the output width) with the scalars s and b."""

    def __init__(self, config: EmbedderConfig) -> None:
        super().__init__()
        self.config = config
        self.version: str | None = None  # set when saved or loaded
        generator = torch.Generator().manual_seed(config.seed)
        dims = [config.input_dim, *config.widths]
        layers: list[nn.Module] = []
        for depth, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
            linear = nn.Linear(fan_in, fan_out)
            nn.init.xavier_uniform_(linear.weight, generator=generator)
            nn.init.zeros_(linear.bias)
            layers.append(linear)
            if depth < len(config.widths) - 1:
                layers += [nn.ReLU(), nn.Dropout(config.dropout)]
        self.mlp = nn.Sequential(*layers)
        self.scale = nn.Parameter(torch.tensor(float(config.init_scale)))
        self.bias = nn.Parameter(torch.tensor(0.0))

    def g(self, features: torch.Tensor) -> torch.Tensor:
        """The shared MLP on raw features (parts normalised first if configured), not normalised after."""
        if self.config.normalise_parts:
            image, text = features.split([self.config.image_dim, self.config.input_dim - self.config.image_dim], dim=-1)
            features = torch.cat([F.normalize(image, dim=-1), F.normalize(text, dim=-1)], dim=-1)
        return self.mlp(features)

    def forward(self, query_features: torch.Tensor, train_features: torch.Tensor) -> torch.Tensor:
        """Logits s · cos(g(φq), g(φz)) + b of paired rows; higher means a larger rank label, less influential."""
        cosine = F.cosine_similarity(self.g(query_features), self.g(train_features), dim=-1)
        return self.scale * cosine + self.bias

    def pair_logits(self, queries: torch.Tensor, train: torch.Tensor, q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """`forward` of the pairs (queries[q], train[z]), running g once per distinct row: a batch of pairs
        repeats its queries and training images many times over (about 3x fewer MLP rows on the demo)."""
        distinct_q, q_at = torch.unique(q, return_inverse=True)
        distinct_z, z_at = torch.unique(z, return_inverse=True)
        cosine = F.cosine_similarity(self.g(queries[distinct_q])[q_at], self.g(train[distinct_z])[z_at], dim=-1)
        return self.scale * cosine + self.bias

    @property
    def retrieval_sign(self) -> float:
        """-sign(s): the factor on query embeddings that makes the largest inner product the most influential."""
        return 1.0 if self.scale.item() <= 0 else -1.0

    @torch.no_grad()
    def _embed(self, features: np.ndarray, sign: float) -> np.ndarray:
        if features.ndim != 2 or features.shape[1] != self.config.input_dim:
            raise ValueError(
                f"features have {features.shape[-1]} columns but the embedder takes {self.config.input_dim} "
                f"({self.config.image_dim} image + {self.config.input_dim - self.config.image_dim} text): "
                "re-materialize attribution_embedder after changing the encoders"
            )
        was_training = self.training
        self.eval()
        device = self.scale.device
        parts = []
        for start in range(0, len(features), EMBED_BATCH):
            chunk = torch.as_tensor(features[start : start + EMBED_BATCH], dtype=torch.float32, device=device)
            parts.append((sign * F.normalize(self.g(chunk), dim=-1)).cpu())
        self.train(was_training)
        out = torch.cat(parts) if parts else torch.empty(0, self.config.widths[-1])
        return out.numpy().astype(np.float32)

    def embed_queries(self, features: np.ndarray) -> np.ndarray:
        """(n, out) float32 unit vectors, already multiplied by `retrieval_sign`."""
        return self._embed(features, self.retrieval_sign)

    def embed_training(self, features: np.ndarray) -> np.ndarray:
        """(n, out) float32 unit vectors for the index: max inner product with a query = most influential."""
        return self._embed(features, 1.0)

    def query_network(self, spec: EncoderSpec) -> Network:
        """`embed_queries` as one network that the runtime `spec` picks runs (ONNX Runtime on CPU). A served
        query reaches the MLP after its encoders have pushed the weights out of the caches, and there a dozen
        eager ops took 1.2 ms against 0.3 for one ONNX Runtime call (demo, 2 cores); the features agree to 1e-6."""
        from gda.encoders.runtime import compile_network

        if self.version is None:
            raise ValueError("only a saved or loaded embedder has a version to cache its query network under")
        example = np.zeros((2, self.config.input_dim), dtype=np.float32)
        return compile_network(_QueryEmbedding(self), [example], ["query_features"], spec, f"embedder:{self.version}")


class _QueryEmbedding(nn.Module):
    """-sign(s) · normalize(g(φ)), with the sign fixed: the network `Embedder.query_network` runs."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder
        self.sign = embedder.retrieval_sign

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sign * F.normalize(self.embedder.g(features), dim=-1)


@dataclass(frozen=True)
class Validation:
    """Held-out queries: their features and full teacher rankings as pairs (no negatives), rows into the
    validation query features and the training features; positives for mAP are each query's top `L`."""

    query_features: np.ndarray
    pairs: PairRows
    L: int


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    scale: float
    bias: float
    val_loss: float | None = None
    val_map: float | None = None
    val_map_se: float | None = None


def teacher_and_embedder_rankings(
    embedder: Embedder, query_features: np.ndarray, train_features: np.ndarray, pairs: PairRows
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per query row: its candidates' train rows in teacher order (ascending label) and in embedder order."""
    by_query = np.argsort(pairs.query_rows, kind="stable")
    queries, starts = np.unique(pairs.query_rows[by_query], return_index=True)
    candidates = np.unique(pairs.train_rows)
    q_emb = embedder.embed_queries(query_features[queries])
    t_emb = embedder.embed_training(train_features[candidates])
    teacher, student = {}, {}
    for position, mine in enumerate(np.split(by_query, starts[1:])):
        rows = pairs.train_rows[mine]
        scores = t_emb[np.searchsorted(candidates, rows)] @ q_emb[position]
        teacher[int(queries[position])] = rows[np.argsort(pairs.labels[mine], kind="stable")]
        student[int(queries[position])] = rows[np.argsort(-scores, kind="stable")]
    return teacher, student


def pair_loss(loss: str, logits: torch.Tensor, labels: torch.Tensor, query_rows: torch.Tensor) -> torch.Tensor:
    """The batch's mean loss of the kind ``loss`` (one of LOSSES); a lower label is more influential."""
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, labels)
    if loss == "mse":
        return F.mse_loss(torch.sigmoid(logits), labels)
    ahead = (query_rows[:, None] == query_rows[None, :]) & (labels[:, None] < labels[None, :])
    if not bool(ahead.any()):
        return logits.sum() * 0.0
    # The row ahead should get the lower logit: softplus(l_ahead - l_behind) -> 0 as it does.
    return F.softplus(logits[:, None] - logits[None, :])[ahead].mean()


def _loss(embedder: Embedder, queries: torch.Tensor, train: torch.Tensor, rows: PairRows, batch_size: int) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            q = torch.from_numpy(rows.query_rows[start : start + batch_size]).to(queries.device)
            z = torch.from_numpy(rows.train_rows[start : start + batch_size]).to(queries.device)
            y = torch.from_numpy(rows.labels[start : start + batch_size]).to(queries.device)
            logits = embedder.pair_logits(queries, train, q, z)
            total += float(pair_loss(embedder.config.loss, logits, y, q)) * len(y)
    return total / len(rows)


def _validate(
    embedder: Embedder, validation: Validation, train_features: np.ndarray, train: torch.Tensor, batch_size: int
) -> dict[str, float | None]:
    queries = torch.as_tensor(validation.query_features, dtype=torch.float32, device=train.device)
    teacher, student = teacher_and_embedder_rankings(
        embedder, validation.query_features, train_features, validation.pairs
    )
    result = map_at(teacher, student, validation.L)
    return {
        "val_loss": _loss(embedder, queries, train, validation.pairs, batch_size),
        "val_map": result.mean,
        "val_map_se": None if math.isnan(result.standard_error) else result.standard_error,
    }


def train_embedder(
    config: EmbedderConfig,
    query_features: np.ndarray,
    train_features: np.ndarray,
    pairs: PairRows,
    validation: Validation | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[Embedder, list[EpochRecord]]:
    """AdamW on ``config.loss`` against the soft rank labels; one record per epoch (validation if given).
    With ``config.keep_best_epoch`` and validation, the returned weights are those of the epoch with the best
    validation mAP (the history still holds every epoch).

    Deterministic given `config.seed` on one device and thread count: it seeds the initialisation, the shuffle
    and dropout (in a forked RNG, leaving the global one untouched).
    """
    if len(pairs) == 0:
        raise ValueError("no training pairs")
    for name, matrix in (("query", query_features), ("train", train_features)):
        if matrix.ndim != 2 or matrix.shape[1] != config.input_dim:
            raise ValueError(f"{name} features {matrix.shape} do not have input_dim {config.input_dim} columns")
    device = torch.device(device)
    queries = torch.as_tensor(query_features, dtype=torch.float32, device=device)
    train = torch.as_tensor(train_features, dtype=torch.float32, device=device)
    shuffle = np.random.default_rng(config.seed)
    history = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        embedder = Embedder(config).to(device)
        optimiser = torch.optim.AdamW(embedder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        for epoch in tqdm(range(config.epochs), desc="embedder", unit="epoch", disable=not progress):
            embedder.train()
            total = 0.0
            for batch in epoch_batches(pairs, config.batch_size, shuffle):
                q, z, y = (t.to(device) for t in batch)
                loss = pair_loss(config.loss, embedder.pair_logits(queries, train, q, z), y, q)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += loss.item() * len(y)
            embedder.eval()
            record = EpochRecord(epoch, total / len(pairs), embedder.scale.item(), embedder.bias.item())
            if validation is not None:
                record = replace(record, **_validate(embedder, validation, train_features, train, config.batch_size))
            history.append(record)
            if (
                config.keep_best_epoch
                and record.val_map is not None
                and record.val_map >= max(r.val_map for r in history if r.val_map is not None)
            ):
                best = {name: t.detach().clone() for name, t in embedder.state_dict().items()}
        if config.keep_best_epoch and validation is not None:
            embedder.load_state_dict(best)
    return embedder, history


def _version(weights: bytes) -> str:
    return hashlib.sha256(weights).hexdigest()[:12]


def save_embedder(folder: str | Path, embedder: Embedder) -> str:
    """Write `folder/model.safetensors` and `folder/config.json` (each via a temp file and rename); the version.

    Weights are replaced before the config: a reader in between sees a version mismatch, never silent new weights.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in embedder.state_dict().items()}
    weights_tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(weights_tmp), metadata={"writer": "gda.embedder"})
    version = _version(weights_tmp.read_bytes())
    config_tmp = folder / f".{CONFIG_FILE}.tmp"
    config_tmp.write_text(json.dumps({"version": version, "config": embedder.config.to_dict()}, indent=2))
    os.replace(weights_tmp, folder / WEIGHTS_FILE)
    os.replace(config_tmp, folder / CONFIG_FILE)
    embedder.version = version
    return version


def load_embedder(folder: str | Path, device: str | torch.device = "cpu") -> Embedder:
    """The embedder saved in `folder`, in eval mode; ValueError (one line) if config and weights disagree."""
    folder = Path(folder)
    try:
        saved = json.loads((folder / CONFIG_FILE).read_text())
        config = EmbedderConfig.from_dict(saved["config"])
        version = saved["version"]
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{folder / CONFIG_FILE}: not a valid embedder config ({error})") from error
    weights = (folder / WEIGHTS_FILE).read_bytes()
    if _version(weights) != version:
        raise ValueError(f"{folder}: {WEIGHTS_FILE} has version {_version(weights)}, {CONFIG_FILE} says {version}")
    embedder = Embedder(config)
    expected = {name: tuple(t.shape) for name, t in embedder.state_dict().items()}
    state = load_file(str(folder / WEIGHTS_FILE))
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        diff = sorted(
            f"{name} {found.get(name, 'missing')} vs {expected.get(name, 'unexpected')}"
            for name in set(found) | set(expected)
            if found.get(name) != expected.get(name)
        )
        raise ValueError(f"{folder}: weights do not match {CONFIG_FILE} (saved vs config): {'; '.join(diff)}")
    embedder.load_state_dict(state)
    embedder.version = version
    return embedder.to(device).eval()

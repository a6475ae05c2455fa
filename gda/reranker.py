"""A second stage over the student's cosine search: a small MLP that re-orders the top ``M`` training images of
a query, trained on the same teacher pairs as the student.

The student must put a query and an image in one vector space, so it can only express influence as a
cosine; the re-ranker sees each pair together: the product and the difference of the two student vectors,
the student's cosine and the cosines of the two raw feature parts. It scores M pairs per answer, not N, so
it keeps the online path's cost bounded (M x a few thousand multiply-adds). Its loss is the student's BCE on
the teacher's rank label (0 = most influential), so a lower logit ranks first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gda.ranking import PairRows, epoch_batches, row_positions


@dataclass(frozen=True)
class RerankerConfig:
    top_m: int  # the cosine shortlist each query re-orders
    hidden: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 4096
    epochs: int = 10
    seed: int = 0


@dataclass(frozen=True)
class PairInputs:
    """What a pair's features are made of, per query and per training row."""

    query_vectors: np.ndarray  # the student's query embeddings (n_queries, d)
    train_vectors: np.ndarray  # the student's training embeddings (n_train, d)
    query_features: np.ndarray  # the raw concat(image, text) features
    train_features: np.ndarray
    image_dim: int


def _unit(values: torch.Tensor) -> torch.Tensor:
    return F.normalize(values, dim=-1)


def pair_features(inputs: PairInputs, query_rows: np.ndarray, train_rows: np.ndarray) -> torch.Tensor:
    """(pairs, 2d + 3) float32: q*z, |q - z|, cos(q, z), and the image and text parts' raw cosines."""
    q = torch.from_numpy(inputs.query_vectors[query_rows])
    z = torch.from_numpy(inputs.train_vectors[train_rows])
    raw_q = torch.from_numpy(inputs.query_features[query_rows])
    raw_z = torch.from_numpy(inputs.train_features[train_rows])
    split = inputs.image_dim
    image = (_unit(raw_q[:, :split]) * _unit(raw_z[:, :split])).sum(-1, keepdim=True)
    text = (_unit(raw_q[:, split:]) * _unit(raw_z[:, split:])).sum(-1, keepdim=True)
    return torch.cat([q * z, (q - z).abs(), (q * z).sum(-1, keepdim=True), image, text], dim=-1)


class Reranker(nn.Module):
    def __init__(self, input_dim: int, config: RerankerConfig) -> None:
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
            torch.manual_seed(config.seed)
            self.mlp = nn.Sequential(nn.Linear(input_dim, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features).squeeze(-1)


def train_reranker(config: RerankerConfig, inputs: PairInputs, pairs: PairRows) -> Reranker:
    """The re-ranker fitted to ``pairs`` (the student's training pairs, rank labels in [0, 1])."""
    model = Reranker(2 * inputs.query_vectors.shape[1] + 3, config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    for _ in range(config.epochs):
        model.train()
        for batch in epoch_batches(pairs, config.batch_size, rng):
            features = pair_features(inputs, batch.query_rows.numpy(), batch.train_rows.numpy())
            loss = F.binary_cross_entropy_with_logits(model(features), batch.labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return model.eval()


@torch.no_grad()
def rerank(
    model: Reranker,
    inputs: PairInputs,
    rankings: Mapping[int, np.ndarray],
    query_rows: Mapping[int, int],
    train_ids: np.ndarray,
) -> dict[int, np.ndarray]:
    """Each query's ranking (training ids by descending cosine) with its first ``top_m`` re-ordered by the
    re-ranker; the rest keep the cosine order. ``query_rows`` and ``train_ids`` place ids in the inputs."""
    out = {}
    for query_id, ranking in rankings.items():
        head = ranking[: model.config.top_m]
        rows = row_positions(head, train_ids, "train ids")
        order = torch.argsort(model(pair_features(inputs, np.full(len(head), query_rows[query_id]), rows)), stable=True)
        out[query_id] = np.concatenate([head[order.numpy()], ranking[len(head) :]])
    return out

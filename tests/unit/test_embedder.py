"""gda.embedder: the shared MLP, the retrieval sign, training on a synthetic teacher, save/load.

The synthetic teacher: features are an image part and a text part (random directions, random per-part
magnitudes); a hidden linear map W of the part-normalised features defines influence as cos(W u_q, W u_z).
Each query's candidates are its nearest 200 of 400 training items by plain cosine (as DINO kNN would give),
ranked by the hidden influence. A student that learns W beats both random and the plain cosine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from gda import index
from gda.embedder import (
    Embedder,
    EmbedderConfig,
    EpochRecord,
    Validation,
    load_embedder,
    pair_loss,
    save_embedder,
    teacher_and_embedder_rankings,
    train_embedder,
)
from gda.encoders import EncoderSpec
from gda.ranking import PairRows, to_rows, training_pairs
from gda.retrieval_metrics import map_at, random_average_precision

IMAGE, TEXT, N_QUERIES, N_TRAIN, K, L = 16, 16, 60, 400, 200, 10
N_FIT = 45  # queries to train on; the other 15 are held out
SMALL = EmbedderConfig(input_dim=IMAGE + TEXT, image_dim=IMAGE, widths=(24, 24, 8), seed=3)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return unit_rows(a) @ unit_rows(b).T


@dataclass(frozen=True)
class Synthetic:
    query_ids: np.ndarray
    train_ids: np.ndarray
    query_features: np.ndarray
    train_features: np.ndarray
    raw_cosine: np.ndarray  # (queries, train) baseline similarity
    fit: PairRows
    held_out: PairRows


def synthetic(seed: int) -> Synthetic:
    rng = np.random.default_rng(seed)

    def features(n: int) -> tuple[np.ndarray, np.ndarray]:
        unit = np.hstack([unit_rows(rng.normal(size=(n, IMAGE))), unit_rows(rng.normal(size=(n, TEXT)))])
        magnitude = (
            np.repeat(rng.uniform(0.5, 5, size=(n, 1)), IMAGE, 1),
            np.repeat(rng.uniform(0.2, 2, size=(n, 1)), TEXT, 1),
        )
        return unit, (unit * np.hstack(magnitude)).astype(np.float32)

    query_unit, query_features = features(N_QUERIES)
    train_unit, train_features = features(N_TRAIN)
    hidden = rng.normal(size=(IMAGE + TEXT, 8))
    influence = cosine(query_unit @ hidden, train_unit @ hidden)
    nearest = cosine(query_unit, train_unit)
    query_ids, train_ids = np.arange(N_QUERIES) * 5 + 3, np.arange(N_TRAIN) * 7 + 1
    frames = []
    for q in range(N_QUERIES):
        candidates = np.argsort(-nearest[q])[:K]
        ranked = candidates[np.argsort(-influence[q, candidates])]
        frames.append(
            pl.DataFrame(
                {
                    "query_id": np.full(K, query_ids[q], dtype=np.int64),
                    "train_id": train_ids[ranked],
                    "rank": np.arange(K, dtype=np.int32),
                    "n_candidates": np.full(K, K, dtype=np.int32),
                }
            )
        )
    scores = pl.concat(frames)
    fit_scores = scores.filter(pl.col("query_id").is_in(query_ids[:N_FIT].tolist()))
    held_scores = scores.filter(pl.col("query_id").is_in(query_ids[N_FIT:].tolist()))
    fit = training_pairs(fit_scores, train_ids, np.random.default_rng(seed))
    held_out = training_pairs(held_scores, train_ids, np.random.default_rng(seed), p_negative=0.0)
    return Synthetic(
        query_ids,
        train_ids,
        query_features,
        train_features,
        cosine(query_features, train_features),
        to_rows(fit, query_ids, train_ids),
        to_rows(held_out, query_ids, train_ids),
    )


@pytest.fixture(scope="module")
def data() -> Synthetic:
    return synthetic(0)


@pytest.fixture(scope="module")
def trained(data: Synthetic) -> tuple[Embedder, list[EpochRecord]]:
    config = EmbedderConfig(
        input_dim=IMAGE + TEXT, image_dim=IMAGE, widths=(64, 64, 16), lr=1e-2, batch_size=512, epochs=25, seed=0
    )
    validation = Validation(data.query_features, data.held_out, L)
    return train_embedder(config, data.query_features, data.train_features, data.fit, validation)


def faiss_rankings(
    data: Synthetic, query_embeddings: np.ndarray, train_embeddings: np.ndarray
) -> dict[int, np.ndarray]:
    """Held-out queries' candidate rows in the order of a plain max-inner-product FAISS search over all items."""
    searched = index.build(np.arange(N_TRAIN), train_embeddings)
    queries = np.unique(data.held_out.query_rows)
    found, _ = index.search(searched, query_embeddings[queries], N_TRAIN)
    out = {}
    for query, order in zip(queries.tolist(), found, strict=True):
        candidates = set(data.held_out.train_rows[data.held_out.query_rows == query].tolist())
        out[query] = np.array([row for row in order if row in candidates])
    return out


def test_architecture_follows_the_config() -> None:
    model = Embedder(EmbedderConfig(input_dim=32, image_dim=12, widths=(20, 20, 8), dropout=0.25, seed=1))
    kinds = [type(m) for m in model.mlp]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    linears = [m for m in model.mlp if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(20, 32), (20, 20), (8, 20)]
    assert all(m.p == 0.25 for m in model.mlp if isinstance(m, nn.Dropout))
    for m in linears:
        bound = np.sqrt(6 / sum(m.weight.shape))  # Xavier uniform
        assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.8 * bound
        assert not m.bias.any()
    assert model.scale.item() == -1.0 and model.bias.item() == 0.0
    same = Embedder(EmbedderConfig(input_dim=32, image_dim=12, widths=(20, 20, 8), dropout=0.25, seed=1))
    other = Embedder(EmbedderConfig(input_dim=32, image_dim=12, widths=(20, 20, 8), dropout=0.25, seed=2))
    assert torch.equal(model.mlp[0].weight, same.mlp[0].weight)
    assert not torch.equal(model.mlp[0].weight, other.mlp[0].weight)


def test_normalise_parts_makes_each_part_scale_free() -> None:
    x = np.random.default_rng(0).normal(size=(5, IMAGE + TEXT)).astype(np.float32)
    scaled = x * np.r_[np.full(IMAGE, 7.0), np.full(TEXT, 0.3)].astype(np.float32)
    normalised = Embedder(SMALL)
    np.testing.assert_allclose(normalised.embed_training(scaled), normalised.embed_training(x), atol=1e-5)
    raw = Embedder(EmbedderConfig(**{**SMALL.to_dict(), "normalise_parts": False}))
    assert np.abs(raw.embed_training(scaled) - raw.embed_training(x)).max() > 1e-2


def test_logits_are_scaled_cosine_plus_bias() -> None:
    model = Embedder(SMALL).eval()
    with torch.no_grad():
        model.scale.fill_(-2.5)
        model.bias.fill_(0.4)
    q, z = np.random.default_rng(1).normal(size=(2, 6, IMAGE + TEXT)).astype(np.float32)
    cos = np.sum(model.embed_training(q) * model.embed_training(z), axis=1)
    with torch.no_grad():
        logits = model(torch.from_numpy(q), torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(logits, -2.5 * cos + 0.4, atol=1e-5)


@pytest.mark.parametrize("scale", [2.0, -2.0])
def test_inner_product_search_returns_the_lowest_logit_first(scale: float) -> None:
    # Low logit = low predicted rank label = most influential, whichever sign s has.
    model = Embedder(SMALL).eval()
    with torch.no_grad():
        model.scale.fill_(scale)
        model.bias.fill_(0.3)
    assert model.retrieval_sign == -np.sign(scale)
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(4, IMAGE + TEXT)).astype(np.float32)
    items = rng.normal(size=(50, IMAGE + TEXT)).astype(np.float32)
    found, _ = index.search(index.build(np.arange(50), model.embed_training(items)), model.embed_queries(queries), 50)
    with torch.no_grad():
        logits = (
            model(torch.from_numpy(np.repeat(queries, 50, axis=0)), torch.from_numpy(np.tile(items, (4, 1))))
            .view(4, 50)
            .numpy()
        )
    for q in range(4):
        in_search_order = logits[q, found[q]]
        assert np.all(np.diff(in_search_order) >= -1e-5)
        assert in_search_order[0] == pytest.approx(logits[q].min(), abs=1e-5)


def test_student_recovers_a_synthetic_teacher(data: Synthetic, trained: tuple[Embedder, list[EpochRecord]]) -> None:
    model, history = trained
    assert len(history) == 25 and [r.epoch for r in history] == list(range(25))
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].scale < 0 and history[-1].scale == pytest.approx(model.scale.item())
    assert history[-1].val_loss is not None and history[-1].val_loss < history[0].val_loss

    teacher, _ = teacher_and_embedder_rankings(model, data.query_features, data.train_features, data.held_out)
    student = map_at(
        teacher,
        faiss_rankings(data, model.embed_queries(data.query_features), model.embed_training(data.train_features)),
        L,
    )
    assert student.mean == pytest.approx(history[-1].val_map, abs=1e-6)  # FAISS search = the trainer's ranking
    raw = map_at(teacher, {q: rows[np.argsort(-data.raw_cosine[q, rows])] for q, rows in teacher.items()}, L)
    random = random_average_precision(K, L)
    assert student.n_queries == N_QUERIES - N_FIT
    assert student.mean > 4 * random
    assert student.mean > raw.mean + 0.2


def test_the_opposite_direction_ranks_worse_than_random(
    data: Synthetic, trained: tuple[Embedder, list[EpochRecord]]
) -> None:
    # Ranking by +s·cos (the prototype's bug) puts the least influential first.
    model, history = trained
    teacher, _ = teacher_and_embedder_rankings(model, data.query_features, data.train_features, data.held_out)
    flipped = map_at(
        teacher,
        faiss_rankings(data, -model.embed_queries(data.query_features), model.embed_training(data.train_features)),
        L,
    )
    assert flipped.mean < random_average_precision(K, L)
    assert flipped.mean < history[-1].val_map / 5


def test_training_is_deterministic_and_leaves_the_global_rng_alone(data: Synthetic) -> None:
    config = EmbedderConfig(**{**SMALL.to_dict(), "batch_size": 1024, "epochs": 2})
    before = torch.random.get_rng_state()
    one, history_one = train_embedder(config, data.query_features, data.train_features, data.fit)
    two, history_two = train_embedder(config, data.query_features, data.train_features, data.fit)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert history_one == history_two and history_one[0].val_map is None
    np.testing.assert_array_equal(one.embed_training(data.train_features), two.embed_training(data.train_features))
    with pytest.raises(ValueError, match="input_dim"):
        train_embedder(config, data.query_features[:, :-1], data.train_features, data.fit)


def test_save_load_round_trip(tmp_path: Path, trained: tuple[Embedder, list[EpochRecord]], data: Synthetic) -> None:
    model, _ = trained
    folder = tmp_path / "embedder"
    version = save_embedder(folder, model)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert version == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:12]
    loaded = load_embedder(folder)
    assert loaded.version == version and loaded.config == model.config and not loaded.training
    np.testing.assert_array_equal(loaded.embed_queries(data.query_features), model.embed_queries(data.query_features))
    np.testing.assert_array_equal(loaded.embed_training(data.train_features), model.embed_training(data.train_features))
    assert save_embedder(folder, loaded) == version  # same weights, same bytes, same version


def test_mismatched_or_corrupted_files_give_one_line_errors(tmp_path: Path) -> None:
    folder = tmp_path / "embedder"
    save_embedder(folder, Embedder(SMALL))
    config_path = folder / "config.json"
    saved = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**saved, "config": {**saved["config"], "widths": [24, 32, 8]}}))
    with pytest.raises(ValueError, match=r"weights do not match config.json") as error:
        load_embedder(folder)
    assert "mlp.3.weight (24, 24) vs (32, 24)" in str(error.value) and "\n" not in str(error.value)

    config_path.write_text(json.dumps({**saved, "config": {**saved["config"], "hidden": 3}}))
    with pytest.raises(ValueError, match=r"not a valid embedder config .*unknown embedder config keys \['hidden'\]"):
        load_embedder(folder)

    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid embedder config"):
        load_embedder(folder)

    save_embedder(folder, Embedder(EmbedderConfig(**{**SMALL.to_dict(), "seed": 9})))  # other weights ...
    config_path.write_text(json.dumps(saved))  # ... beside the old config
    with pytest.raises(ValueError, match="has version .* config.json says"):
        load_embedder(folder)


@pytest.mark.parametrize("runtime", ["onnx", "eager"])
def test_the_query_network_embeds_queries_as_embed_queries_does(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    trained: tuple[Embedder, list[EpochRecord]],
    data: Synthetic,
    runtime: str,
) -> None:
    monkeypatch.setenv("GDA_CACHE_DIR", str(tmp_path / "cache"))
    model, _ = trained
    with pytest.raises(ValueError, match="only a saved or loaded embedder"):
        Embedder(SMALL).query_network(EncoderSpec(runtime=runtime))
    save_embedder(tmp_path / "embedder", model)
    loaded = load_embedder(tmp_path / "embedder")
    network = loaded.query_network(EncoderSpec(runtime=runtime, threads=1))
    expected = loaded.embed_queries(data.query_features)
    assert np.ptp(expected, axis=0).max() > 0.1  # queries embed apart, so a constant output would not pass
    np.testing.assert_allclose(network(data.query_features), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(network(data.query_features[:1]), expected[:1], rtol=0, atol=1e-5)


def test_features_of_another_width_are_one_clear_error() -> None:
    model = Embedder(SMALL)
    wrong = np.zeros((3, SMALL.input_dim + 5), dtype=np.float32)
    for embed in (model.embed_queries, model.embed_training):
        with pytest.raises(
            ValueError, match=f"features have {SMALL.input_dim + 5} columns but the embedder takes {SMALL.input_dim}"
        ):
            embed(wrong)


def test_each_loss_is_its_formula_on_a_hand_example() -> None:
    logits = torch.tensor([0.1, 0.5, -0.2, 0.3])
    labels = torch.tensor([0.0, 0.5, 0.2, 1.0])
    queries = torch.tensor([0, 0, 1, 1])
    sigmoid = [1 / (1 + np.exp(-v)) for v in logits.tolist()]
    bce = np.mean([-(y * np.log(p) + (1 - y) * np.log(1 - p)) for p, y in zip(sigmoid, labels.tolist(), strict=True)])
    mse = np.mean([(p - y) ** 2 for p, y in zip(sigmoid, labels.tolist(), strict=True)])
    # Pairs of one query with the first more influential (lower label): (0, 1) and (2, 3).
    pairwise = np.mean([np.log1p(np.exp(0.1 - 0.5)), np.log1p(np.exp(-0.2 - 0.3))])
    for loss, expected in (("bce", bce), ("mse", mse), ("pairwise", pairwise)):
        assert float(pair_loss(loss, logits, labels, queries)) == pytest.approx(expected, rel=1e-6), loss
    with pytest.raises(ValueError, match="loss must be one of"):
        EmbedderConfig(input_dim=IMAGE + TEXT, image_dim=IMAGE, loss="hinge")


def test_keep_best_epoch_returns_the_weights_of_the_best_validation_map(data: Synthetic) -> None:
    config = EmbedderConfig(
        input_dim=IMAGE + TEXT, image_dim=IMAGE, widths=(64, 16), lr=3e-2, batch_size=512, epochs=8, seed=1
    )
    validation = Validation(data.query_features, data.held_out, L)
    kept, history = train_embedder(
        replace(config, keep_best_epoch=True), data.query_features, data.train_features, data.fit, validation
    )
    last, same_history = train_embedder(config, data.query_features, data.train_features, data.fit, validation)
    assert history == same_history  # keeping a copy changes nothing in the training itself
    for model, expected in ((kept, max(r.val_map for r in history)), (last, history[-1].val_map)):
        rankings = teacher_and_embedder_rankings(model, data.query_features, data.train_features, data.held_out)
        assert map_at(*rankings, L).mean == pytest.approx(expected, abs=1e-9)

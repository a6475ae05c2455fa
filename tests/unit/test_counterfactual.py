"""gda.counterfactual: cells, the reduced training set, retraining with θ0's recipe, and the summary."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from gda import counterfactual as cf
from gda.diffusion import ScratchModelConfig, build_from_scratch, load, sample, save, train

TINY = ScratchModelConfig(
    sample_size=16, block_channels=(16, 32), attention_levels=(False, True), attention_heads=2, text_max_length=8
)
RECIPE = {"steps": 6, "batch_size": 8, "lr": 2e-3, "seed": 3, "cfg_dropout": 0.1}
N = 20


@pytest.fixture(scope="module")
def data() -> cf.TrainingSet:
    images = torch.rand(N, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = [[f"a {colour} icon number {i}"] for i, colour in zip(range(N), ["red", "blue"] * (N // 2))]
    return cf.TrainingSet(np.arange(500, 500 + N, dtype=np.int64), images, captions)


@pytest.fixture(scope="module")
def theta0(data: cf.TrainingSet, tmp_path_factory: pytest.TempPathFactory):
    """θ0 as the model asset makes it: built, trained, saved as safetensors and loaded back."""
    bundle = build_from_scratch(TINY)
    train(bundle, data.images, data.captions, **RECIPE)
    folder = tmp_path_factory.mktemp("theta0") / "weights"
    save(bundle, folder)
    return load(folder)


@pytest.fixture(scope="module")
def query(theta0) -> cf.Query:
    generated = sample(theta0, ["a red icon"], [11], steps=4, guidance_scale=2.0)
    return cf.Query(7, "a red icon", 11, generated.samples[0], generated.prompt_states[0])


def test_cell_keys_round_trip_and_cover_every_combination() -> None:
    grid = cf.cells(["random", "teacher"], [5, 50], n_queries=5, group_size=2)
    assert len(grid) == 2 * 2 * 3
    assert {c.key for c in grid} >= {"random-k5-g0", "teacher-k50-g2"}
    assert all(cf.Cell.parse(c.key) == c for c in grid)
    with pytest.raises(ValueError, match="not a counterfactual cell key"):
        cf.Cell.parse("teacher-5-0")
    with pytest.raises(ValueError, match="must be one of"):
        cf.Cell("dino", 5, 0)


def test_query_groups_slice_the_first_test_queries() -> None:
    ids = [40, 10, 30, 20, 50]
    assert cf.group_queries(ids, n_queries=3, group_size=2, group=0) == [10, 20]
    assert cf.group_queries(ids, n_queries=3, group_size=2, group=1) == [30]
    with pytest.raises(ValueError, match="empty"):
        cf.group_queries(ids, n_queries=3, group_size=2, group=2)


def test_the_reduced_set_lacks_exactly_the_removed_images_in_order(data: cf.TrainingSet) -> None:
    removed = [507, 500, 519]
    reduced = data.without(removed)
    assert len(reduced.ids) == N - 3 and not set(removed) & set(reduced.ids.tolist())
    assert reduced.ids.tolist() == [i for i in data.ids.tolist() if i not in removed]
    rows = [i - 500 for i in reduced.ids.tolist()]
    assert torch.equal(reduced.images, data.images[rows])
    assert reduced.captions == [data.captions[r] for r in rows]
    with pytest.raises(ValueError, match="not in the training set"):
        data.without([499])


def test_removing_nothing_retrains_theta0_exactly(data: cf.TrainingSet, theta0, query: cf.Query) -> None:
    """The retrain is θ0's recipe, seed and data order: the only difference a removal makes is the removal."""
    same, result = cf.retrain(TINY, RECIPE, data.without([]))
    assert result.steps == RECIPE["steps"]
    for (name, a), b in zip(theta0.unet.state_dict().items(), same.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert cf.query_loss(same, query, 16, 2) == cf.query_loss(theta0, query, 16, 2)
    assert cf.regeneration_mse(same, query, {"steps": 4, "guidance_scale": 2.0}) == 0.0


def test_removing_images_changes_the_model_and_the_query(data: cf.TrainingSet, theta0, query: cf.Query) -> None:
    reduced, _ = cf.retrain(TINY, RECIPE, data.without(data.ids[:5].tolist()))
    before, after = cf.query_loss(theta0, query, 16, 2), cf.query_loss(reduced, query, 16, 2)
    assert math.isfinite(after - before) and after != before
    mse = cf.regeneration_mse(reduced, query, {"steps": 4, "guidance_scale": 2.0})
    assert 0 < mse < 1


def test_summary_pairs_each_method_with_random_on_the_same_queries() -> None:
    rows = pl.DataFrame(
        {
            "method": ["random", "random", "teacher", "teacher", "distilled"],
            "k": [10] * 5,
            "query_id": [1, 2, 1, 2, 1],
            "delta_loss": [0.001, 0.003, 0.004, 0.010, 0.002],
            "pixel_mse": [0.01, 0.02, 0.03, 0.05, 0.02],
        }
    )
    table = cf.summary(rows)
    assert table["method"].to_list() == ["random", "distilled", "teacher"]
    teacher = table.filter(pl.col("method") == "teacher").row(0, named=True)
    assert teacher["delta_loss"] == pytest.approx(0.007)
    assert teacher["delta_loss_se"] == pytest.approx(np.std([0.004, 0.010], ddof=1) / math.sqrt(2))
    assert teacher["over_random"] == pytest.approx(np.mean([0.003, 0.007]))
    assert teacher["over_random_se"] == pytest.approx(np.std([0.003, 0.007], ddof=1) / math.sqrt(2))
    distilled = table.filter(pl.col("method") == "distilled").row(0, named=True)
    assert distilled["n_queries"] == 1 and distilled["over_random"] == pytest.approx(0.001)
    assert math.isnan(distilled["delta_loss_se"])
    text = cf.markdown_table(table)
    assert "| teacher | 10 | 2 | 7.000 ± 3.000 | 5.000 ± 2.000 | 40.000 ± 10.000 |" in text

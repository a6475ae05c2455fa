"""bench/index_scale.py and bench/gpu.py at test sizes: what they measure is what the index holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import bench
from bench import index_scale, synthetic


def test_synthetic_vectors_have_the_real_spectrum() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(4000, 16)) * np.geomspace(4.0, 0.05, 16)
    drawn = synthetic.draw(synthetic.spectrum(real), 20_000, seed=(1, 2))
    np.testing.assert_allclose(np.linalg.norm(drawn, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(drawn, synthetic.draw(synthetic.spectrum(real), 20_000, seed=(1, 2)))
    # Unit rows of the same Gaussian: the eigenvalues of the real rows, normalised the same way, match.
    normalised = real / np.linalg.norm(real, axis=1, keepdims=True)
    expected = np.linalg.eigvalsh(np.cov(normalised, rowvar=False))[::-1][:4]
    measured = np.linalg.eigvalsh(np.cov(drawn, rowvar=False))[::-1][:4]
    np.testing.assert_allclose(measured, expected, rtol=0.1)


def test_index_scale_measures_the_refined_index_it_builds_and_maps() -> None:
    rng = np.random.default_rng(0)
    real = (rng.normal(size=(3000, 32)) * np.geomspace(3.0, 0.1, 32)).astype(np.float32)
    result = index_scale.measure(real, n_vectors=30_000, nlist=64, pq_bytes=8, nprobe=32, refine_factor=32)
    assert result["n_vectors"] == 30_000 and result["dim"] == 32
    # On disk: 8 code bytes and an 8-byte position in the lists, 32 one-byte copies, an 8-byte id.
    assert 56 <= result["disk_bytes_per_vector"] < 60
    assert result["part_bytes"]["refine"] >= 30_000 * 32
    # Mapped, the process itself holds the ids (twice while the id map is filled), not the lists or copies.
    assert result["ram_bytes_per_vector"] < 24
    sweep = {(row["nprobe"], row["refine_factor"]): row["recall_at_10"] for row in result["sweep"]}
    assert result["in_ram"]["recall_at_10"] == sweep[(32, 32)]
    # The copies restore what the 8-byte codes lose, and the mapped index answers as the one in RAM.
    assert result["recall_at_10_codes_alone"] + 0.2 < sweep[(32, 32)]
    assert result["recall_at_10"] == sweep[(32, 32)]


def test_a_widened_spectrum_keeps_the_decay_and_the_mean_length() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(4000, 16)) * np.geomspace(4.0, 0.05, 16) + 0.5
    shape = synthetic.spectrum(real)
    wide = synthetic.widened(shape, 48)
    assert wide.dim == 48
    np.testing.assert_allclose(np.linalg.norm(wide.mean), np.linalg.norm(shape.mean), rtol=1e-5)
    narrow_values = np.sort(np.linalg.eigvalsh(shape.scale @ shape.scale.T))[::-1]
    wide_values = np.sort(np.linalg.eigvalsh(wide.scale @ wide.scale.T))[::-1]
    np.testing.assert_allclose(wide_values.sum(), narrow_values.sum(), rtol=1e-4)
    # The same decay from the first eigenvalue to the last, spread over three times the directions.
    np.testing.assert_allclose(wide_values[0] / wide_values[-1], narrow_values[0] / narrow_values[-1], rtol=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gda bench gpu measures for real")
def test_gpu_bench_says_when_there_is_no_cuda(tmp_path: Path) -> None:
    result = bench.run("gpu", tmp_path / "home", "tiny")
    assert result["cuda"] is False and "sees no CUDA device" in result["reason"]
    assert result["table"] == [["CUDA", "none", result["reason"]]]

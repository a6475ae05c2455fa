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


def test_index_scale_measures_the_ivfpq_index_it_builds() -> None:
    rng = np.random.default_rng(0)
    real = (rng.normal(size=(3000, 32)) * np.geomspace(3.0, 0.1, 32)).astype(np.float32)
    result = index_scale.measure(real, n_vectors=30_000, nlist=32, pq_bytes=8, nprobe=8)
    assert result["n_vectors"] == 30_000 and result["dim"] == 32
    # 8 code bytes and an 8-byte id a vector, plus the quantisers and rotation spread over 30k vectors.
    assert 16 <= result["bytes_per_vector"] < 18
    assert result["on_disk"]["lists_bytes"] == 30_000 * 16
    sweep = {row["nprobe"]: row["recall_at_10"] for row in result["nprobe_sweep"]}
    assert result["recall_at_10"] == sweep[8] and 0.3 < sweep[8] <= 1.0
    # Lists read from a file answer exactly as lists in RAM.
    assert result["on_disk"]["recall_at_10"] == sweep[8]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gda bench gpu measures for real")
def test_gpu_bench_says_when_there_is_no_cuda(tmp_path: Path) -> None:
    result = bench.run("gpu", tmp_path / "home", "tiny")
    assert result["cuda"] is False and "sees no CUDA device" in result["reason"]
    assert result["table"] == [["CUDA", "none", result["reason"]]]

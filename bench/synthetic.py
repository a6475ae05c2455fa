"""Synthetic embeddings for search benchmarks: unit vectors drawn from a Gaussian with the mean and
covariance (so the eigenvalue spectrum) of a home's real training embeddings.

A Gaussian has no cluster structure, which real embeddings do; inverted lists find neighbours more easily
in clustered data, so recall measured on these vectors is, if anything, pessimistic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gda import index

CHUNK = 100_000


@dataclass(frozen=True)
class Spectrum:
    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d, d): eigenvectors times the square roots of their eigenvalues

    @property
    def dim(self) -> int:
        return len(self.mean)


def spectrum(real: np.ndarray) -> Spectrum:
    """The mean and covariance square root of ``real`` (rows are embeddings)."""
    values, vectors = np.linalg.eigh(np.cov(real, rowvar=False))
    scale = vectors * np.sqrt(np.clip(values, 0, None))
    return Spectrum(real.mean(axis=0).astype(np.float32), scale.astype(np.float32))


def draw(shape: Spectrum, rows: int, seed: int | tuple[int, ...]) -> np.ndarray:
    """``rows`` unit vectors; the same ``seed`` gives the same vectors."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, shape.dim), dtype=np.float32)
    for start in range(0, rows, CHUNK):
        stop = min(rows, start + CHUNK)
        out[start:stop] = shape.mean + rng.standard_normal((stop - start, shape.dim), dtype=np.float32) @ shape.scale.T
    return index.normalise(out)


def widened(shape: Spectrum, dim: int, seed: int = 0) -> Spectrum:
    """A ``dim``-wide spectrum for a width no home has (the ``sd`` student's 768): the eigenvalues' decay over
    their relative rank interpolated in log scale, the total variance and the mean's length kept, in random
    orthonormal directions."""
    values = np.sort(np.sum(shape.scale.astype(np.float64) ** 2, axis=0))[::-1]  # scale's column norms²
    log_values = np.log(np.clip(values, values.max() * 1e-12, None))
    wide = np.exp(np.interp(np.linspace(0, 1, dim), np.linspace(0, 1, len(values)), log_values))
    wide *= values.sum() / wide.sum()
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    direction = rng.standard_normal(dim)
    mean = direction / np.linalg.norm(direction) * np.linalg.norm(shape.mean)
    return Spectrum(mean.astype(np.float32), (basis * np.sqrt(wide)).astype(np.float32))

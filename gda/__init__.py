"""gda: fast data attribution for text-to-image models.

This package holds the science (corpus, encoders, diffusion, teacher, student, index, metrics) as plain
PyTorch/FAISS/NumPy/Polars code. It never imports Dagster: `gda_assets` wires it into assets.
"""

__version__ = "0.1.0"

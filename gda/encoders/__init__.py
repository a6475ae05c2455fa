"""Frozen image and text feature encoders.

This module holds the small public API: `EncoderSpec` (which backends and models to use),
`load_image_encoder` / `load_text_encoder`, and the `ImageEncoder` / `TextEncoder` protocols every
backend satisfies. Backends live in their own modules and are imported only when loaded, so importing
`gda.encoders` stays cheap (no torch, no transformers).

Backends:
- image `efficientnet-lite0`: packaged ImageNet EfficientNet-Lite0, 1280-d pooled features.
- text `minilm`: packaged all-MiniLM-L6-v2, 384-d normalised sentence embeddings.
- `hf`: a transformers model from a local folder or the local HF cache (`image_model` / `text_model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from gda.encoders.base import EncoderError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

__all__ = [
    "EncoderError",
    "EncoderSpec",
    "ImageEncoder",
    "TextEncoder",
    "IMAGE_BACKENDS",
    "TEXT_BACKENDS",
    "load_image_encoder",
    "load_text_encoder",
]

IMAGE_BACKENDS = ("efficientnet-lite0", "hf")
TEXT_BACKENDS = ("minilm", "hf")


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoders to build and how to run them.

    `image_model` / `text_model` name a local folder or a hub id already in the HF cache; they are
    only used by the `hf` backend. `image_size` applies to EfficientNet-Lite0 (an `hf` model uses the
    size from its own image processor config). `dtype` ("float32", "float16", "bfloat16") is the `hf`
    models' weight precision; features are returned as float32 either way, and the encoder's version does
    not change with it (the same features, rounded), so features made on a GPU in half precision serve
    queries encoded in float32 on a CPU. The packaged backends run in float32 only. `runtime` runs the
    network with eager PyTorch or ONNX Runtime ("auto": ONNX Runtime on CPU in float32, else eager; see
    gda.encoders.runtime); like dtype, it does not change the version. `threads` bounds ONNX Runtime's threads
    (default: torch's), so that two encoders running side by side each take their share of the cores.
    `text_quantization` "int8" runs the text encoder with 8-bit weights under ONNX Runtime: 3x faster for one
    query on CPU, and other features, so other versions (gda.encoders.runtime says why and what it measured).
    """

    image_backend: str = "efficientnet-lite0"
    image_model: str | None = None
    text_backend: str = "minilm"
    text_model: str | None = None
    image_size: int = 224
    batch_size: int = 64
    device: str = "cpu"
    dtype: str = "float32"
    runtime: str = "auto"
    threads: int | None = None
    text_quantization: str = "none"  # or "int8"


class ImageEncoder(Protocol):
    name: str
    dim: int

    @property
    def version(self) -> str: ...

    def encode(self, images: Sequence[Image.Image], progress: bool = False) -> np.ndarray: ...


class TextEncoder(Protocol):
    name: str
    dim: int

    @property
    def version(self) -> str: ...

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray: ...


def load_image_encoder(spec: EncoderSpec) -> ImageEncoder:
    """Build the image encoder named by `spec.image_backend` (weights loaded, eval mode)."""
    if spec.image_backend != "hf" and spec.dtype != "float32":
        raise EncoderError(f"image backend {spec.image_backend!r} runs in float32 only; set compute dtype float32")
    if spec.image_backend == "efficientnet-lite0":
        from gda.encoders.efficientnet import EfficientNetLite0Encoder

        return EfficientNetLite0Encoder(spec)
    if spec.image_backend == "hf":
        from gda.encoders.hf import HFImageEncoder

        return HFImageEncoder(spec)
    raise EncoderError(f"unknown image backend {spec.image_backend!r}; choose one of {IMAGE_BACKENDS}")


def load_text_encoder(spec: EncoderSpec) -> TextEncoder:
    """Build the text encoder named by `spec.text_backend` (weights loaded, eval mode)."""
    if spec.text_backend != "hf" and spec.dtype != "float32":
        raise EncoderError(f"text backend {spec.text_backend!r} runs in float32 only; set compute dtype float32")
    if spec.text_backend == "minilm":
        from gda.encoders.minilm import MiniLMEncoder

        return MiniLMEncoder(spec)
    if spec.text_backend == "hf":
        from gda.encoders.hf import HFTextEncoder

        return HFTextEncoder(spec)
    raise EncoderError(f"unknown text backend {spec.text_backend!r}; choose one of {TEXT_BACKENDS}")

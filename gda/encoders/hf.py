"""Encoders built from transformers checkpoints on local disk (a folder, or a hub id in the HF cache).

The feature is chosen from the checkpoint's `config.model_type`:
- image `vit` (e.g. DINO ViT-B/16) and `dinov2`: CLS token of the last hidden state, as in FastGDA;
- image `clip` / `clip_vision_model`: CLIP projected `image_embeds`;
- text `clip` / `clip_text_model`: CLIP projected `text_embeds`.
CLIP embeddings are returned as the model gives them (not L2-normalised).

Nothing here touches the network: every load passes `local_files_only=True`. Weights are read from
safetensors only (`use_safetensors=True`: a pickled .bin is never unpickled), and only from inside the model
folder (gda.paths.model_folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    Dinov2Model,
    PreTrainedModel,
    ViTModel,
)

from gda.encoders import EncoderSpec
from gda.encoders.base import EncoderError, encode_batched, version_hash
from gda.encoders.runtime import compile_network, compile_text_network, encode_tokens, version_tag
from gda.images import to_rgb
from gda.paths import model_folder

IMAGE_MODEL_TYPES = ("vit", "dinov2", "clip", "clip_vision_model")
TEXT_MODEL_TYPES = ("clip", "clip_text_model")


def _local_snapshot(model: str, role: str) -> Path:
    """The path `model` itself, or its snapshot in the local HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise EncoderError(
            f"{role} model {model!r} not found: not a local folder and not in the HF cache at "
            f"{constants.HF_HUB_CACHE}; pass a local folder as {role}_model or set HF_HOME / HF_HUB_CACHE "
            "to a cache that holds it (downloads are never attempted)"
        ) from exc


def resolve_model_dir(model: str | None, role: str) -> Path:
    """Local folder holding `model` (a folder, or a hub id in the HF cache), resolved, with safetensors
    weights and nothing that points outside it; one-line errors otherwise, before any weights are read."""
    if not model:
        raise EncoderError(f"{role} backend 'hf' needs a model: set {role}_model to a local folder or cached hub id")
    folder = model_folder(_local_snapshot(model, role), f"{role} model")
    if not any(folder.glob("*.safetensors")):
        raise EncoderError(
            f"{role} model {folder} has no .safetensors weights; pickled .bin / .pt weights are never loaded: "
            "convert them to safetensors"
        )
    return folder


def checkpoint_files(path: Path) -> list[Path]:
    """Weight and config files whose bytes define the model's features (for the version hash)."""
    return [p for p in path.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file()]


def _model_type(path: Path) -> str:
    return AutoConfig.from_pretrained(path, local_files_only=True).model_type


def _frozen(model: PreTrainedModel, spec: EncoderSpec) -> PreTrainedModel:
    if spec.dtype not in ("float32", "float16", "bfloat16"):
        raise EncoderError(f"dtype must be float32, float16 or bfloat16, got {spec.dtype!r}")
    return model.eval().requires_grad_(False).to(spec.device, getattr(torch, spec.dtype))


class HFImageEncoder:
    """Image features from a local ViT / DINOv2 / CLIP vision checkpoint."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.path = resolve_model_dir(spec.image_model, "image")
        self.batch_size = spec.batch_size
        self.device = torch.device(spec.device)
        self.model_type = _model_type(self.path)
        self.name = f"hf:{self.model_type}:{spec.image_model}"
        self.processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        if self.model_type == "vit":
            # The pooler is unused (the feature is the CLS state) and absent from DINO checkpoints.
            model = ViTModel.from_pretrained(
                self.path, add_pooling_layer=False, use_safetensors=True, local_files_only=True
            )
            self.model = _frozen(model, spec)
            self.dim = self.model.config.hidden_size
        elif self.model_type == "dinov2":
            model = Dinov2Model.from_pretrained(self.path, use_safetensors=True, local_files_only=True)
            self.model = _frozen(model, spec)
            self.dim = self.model.config.hidden_size
        elif self.model_type in ("clip", "clip_vision_model"):
            model = CLIPVisionModelWithProjection.from_pretrained(
                self.path, use_safetensors=True, local_files_only=True
            )
            self.model = _frozen(model, spec)
            self.dim = self.model.config.projection_dim
        else:
            raise EncoderError(
                f"image model {spec.image_model!r} has model_type {self.model_type!r}; "
                f"supported: {', '.join(IMAGE_MODEL_TYPES)}"
            )
        example = self.processor(images=[Image.new("RGB", (32, 32))] * 2, return_tensors="np")["pixel_values"]
        network = _ImageFeatures(self.model, self.model_type)
        self._network = compile_network(network, [example], ["pixel_values"], spec, self.version)

    @cached_property
    def version(self) -> str:
        return version_hash("hf-image", checkpoint_files(self.path), self.model_type)

    def encode(self, images: Sequence[Image.Image], progress: bool = False) -> np.ndarray:
        """(n, dim) float32 features for PIL images of any mode and size."""
        return encode_batched(images, self._forward, self.dim, self.batch_size, progress, self.name)

    def _forward(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = self.processor(images=[to_rgb(image) for image in images], return_tensors="np")
        return self._network(pixels["pixel_values"])


class _ImageFeatures(torch.nn.Module):
    """CLIP's projected image embedding, or the CLS state of a ViT / DINOv2: the network the runtime runs."""

    def __init__(self, model: PreTrainedModel, model_type: str) -> None:
        super().__init__()
        self.model = model
        self.projected = model_type in ("clip", "clip_vision_model")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.projected:
            return self.model(pixel_values=pixel_values).image_embeds
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


class HFTextEncoder:
    """Text features from a local CLIP text checkpoint."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.path = resolve_model_dir(spec.text_model, "text")
        self.batch_size = spec.batch_size
        self.device = torch.device(spec.device)
        self.model_type = _model_type(self.path)
        self.name = f"hf:{self.model_type}:{spec.text_model}"
        if self.model_type not in TEXT_MODEL_TYPES:
            raise EncoderError(
                f"text model {spec.text_model!r} has model_type {self.model_type!r}; "
                f"supported: {', '.join(TEXT_MODEL_TYPES)}"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        model = CLIPTextModelWithProjection.from_pretrained(self.path, use_safetensors=True, local_files_only=True)
        self.model = _frozen(model, spec)
        self.dim = self.model.config.projection_dim
        self.max_length = self.model.config.max_position_embeddings
        self.tag = version_tag(spec)
        self._network = compile_text_network(_TextFeatures(self.model), spec, self.version)

    @cached_property
    def version(self) -> str:
        return version_hash("hf-text", checkpoint_files(self.path), f"{self.model_type}{self.tag}")

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """(n, dim) float32 projected text embeddings."""
        return encode_batched(texts, self._forward, self.dim, self.batch_size, progress, self.name)

    def _forward(self, texts: Sequence[str]) -> np.ndarray:
        return encode_tokens(self._network, self.tokenizer, texts, self.max_length)


class _TextFeatures(torch.nn.Module):
    """CLIP's projected text embedding: the network the runtime runs."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds

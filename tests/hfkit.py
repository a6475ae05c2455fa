"""Tiny random Hugging Face checkpoints (ViT / DINOv2 / CLIP vision image models, a CLIP text model with its
tokenizer), built from configs and written with save_pretrained in exactly the layout real ones have."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def save_image_model(path: Path, model_type: str, seed: int = 0) -> Path:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(seed)
    if model_type == "vit":
        model = ViTModel(ViTConfig(**TINY, image_size=32, patch_size=8), add_pooling_layer=False)
        processor = ViTImageProcessor(size={"height": 32, "width": 32})
    elif model_type == "dinov2":
        model = Dinov2Model(Dinov2Config(**TINY, image_size=32, patch_size=8))
        processor = ViTImageProcessor(size={"height": 32, "width": 32})
    else:
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY, image_size=32, patch_size=8, projection_dim=24))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def save_clip_text_model(path: Path) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *(c + "</w>" for c in letters), "re", "red</w>", "ca", "cat</w>"]:
        vocab[token] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>")]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        **TINY,
        vocab_size=len(vocab),
        max_position_embeddings=16,
        projection_dim=20,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModelWithProjection(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path

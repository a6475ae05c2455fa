"""all-MiniLM-L6-v2 text encoder (the demo default).

Sentence embeddings follow sentence-transformers for this model: attention-masked mean pooling over
the last hidden states, then L2 normalisation (384-d). `load_minilm` is shared with the diffusion
model's text conditioner (gda.diffusion.conditioning), which uses the unpooled token states.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from gda.encoders import EncoderSpec
from gda.encoders.base import encode_batched, version_hash
from gda.encoders.packaged import minilm_path
from gda.encoders.runtime import compile_text_network, encode_tokens, version_tag

DIM = 384


def max_seq_length(path: Path) -> int:
    """Token limit sentence-transformers uses for this model (256), from its packaged config."""
    config = path / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["max_seq_length"])
    return 256


def load_minilm(path: Path, device: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, use_safetensors=True, local_files_only=True)
    return tokenizer, model.eval().requires_grad_(False).to(device)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where `mask` is 1 (padding excluded)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm)."""

    name = "minilm"
    dim = DIM

    def __init__(self, spec: EncoderSpec) -> None:
        self.batch_size = spec.batch_size
        self.device = torch.device(spec.device)
        self.path = minilm_path()
        self.max_length = max_seq_length(self.path)
        self.tag = version_tag(spec)
        self.tokenizer, self.model = load_minilm(self.path, spec.device)
        self._network = compile_text_network(_SentenceEmbedding(self.model), spec, self.version)

    @cached_property
    def version(self) -> str:
        files = [self.path / "model.safetensors", self.path / "config.json", self.path / "tokenizer.json"]
        return version_hash(self.name, [f for f in files if f.is_file()], f"max_length={self.max_length}{self.tag}")

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """(n, 384) float32 unit-norm embeddings."""
        return encode_batched(texts, self._forward, self.dim, self.batch_size, progress, self.name)

    def _forward(self, texts: Sequence[str]) -> np.ndarray:
        return encode_tokens(self._network, self.tokenizer, texts, self.max_length)


class _SentenceEmbedding(torch.nn.Module):
    """Masked mean of the last hidden states, L2-normalised: the network the runtime runs."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return torch.nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)

"""The frozen text conditioner: prompts to the token states the UNet cross-attends to.

Two encoders fill this role: all-MiniLM-L6-v2 for models trained from scratch (384-d states) and the
CLIP text encoder of a Stable Diffusion folder (`last_hidden_state`, 77 tokens). A prompt's states
depend on the prompt alone, never on the batch it is in: prompts are padded to a fixed token length,
and every encoder call sees the same number of prompts, because matrix kernels chosen by batch size
round differently (batch 1 vs 3 moved MiniLM states by 3e-5, and 20 DDIM steps amplified that to 2e-3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

ConditionerName = Literal["minilm", "clip"]

# Prompts per encoder call, always (short calls are filled with empty prompts).
ENCODE_BATCH = 16


@dataclass
class TextConditioner:
    """A tokenizer and a frozen text encoder producing (n, max_length, dim) token states.

    `use_attention_mask` is on for MiniLM (a BERT encoder, where padding must be masked) and off for
    CLIP, matching how Stable Diffusion pipelines call their text encoder.
    """

    name: ConditionerName
    tokenizer: PreTrainedTokenizerBase
    encoder: PreTrainedModel
    max_length: int
    use_attention_mask: bool

    def __post_init__(self) -> None:
        self.encoder.eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Float32 token states (n, max_length, dim) on the encoder's device."""
        prompts = list(prompts)
        chunks = [self._encode(prompts[i : i + ENCODE_BATCH]) for i in range(0, len(prompts), ENCODE_BATCH)]
        if not chunks:
            return torch.empty(0, self.max_length, self.dim, device=self.device)
        return torch.cat(chunks)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        filled = prompts + [""] * (ENCODE_BATCH - len(prompts))
        batch = self.tokenizer(
            filled, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        mask = batch["attention_mask"] if self.use_attention_mask else None
        states = self.encoder(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        return states[: len(prompts)].float()


def minilm_conditioner(max_length: int) -> TextConditioner:
    """The packaged all-MiniLM-L6-v2 as a conditioner (CPU; move it with the bundle)."""
    from gda.encoders.minilm import load_minilm
    from gda.encoders.packaged import minilm_path

    tokenizer, encoder = load_minilm(minilm_path(), "cpu")
    return TextConditioner("minilm", tokenizer, encoder, max_length, use_attention_mask=True)

"""EEG-to-text model: frozen encoder embeddings -> Linear bridge -> BART via ``inputs_embeds``."""

from __future__ import annotations

import torch
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration

from trainer.config import BartPreset


class Bridge(nn.Module):
    """Projects encoder states (``d_model`` of the encoder) to BART's width.

    The LayerNorm puts the projected embeddings on the scale BART's own token embeddings have,
    whatever the encoder's output scale.
    """

    def __init__(self, encoder_dim: int, bart_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(encoder_dim, bart_dim)
        self.norm = nn.LayerNorm(bart_dim)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeddings))


def bart_config(preset: BartPreset, vocab_size: int, max_positions: int) -> BartConfig:
    """A BART config of ``preset``'s size for a tokenizer of ``vocab_size`` tokens."""
    return BartConfig(
        vocab_size=vocab_size, d_model=preset.d_model,
        encoder_layers=preset.encoder_layers, decoder_layers=preset.decoder_layers,
        encoder_attention_heads=preset.attention_heads, decoder_attention_heads=preset.attention_heads,
        encoder_ffn_dim=preset.ffn_dim, decoder_ffn_dim=preset.ffn_dim,
        max_position_embeddings=max_positions,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
    )


class EEGToText(nn.Module):
    """Bridge + BART; the encoder stays outside (its embeddings are precomputed)."""

    def __init__(self, encoder_dim: int, bart: BartForConditionalGeneration) -> None:
        super().__init__()
        self.bridge = Bridge(encoder_dim, bart.config.d_model)
        self.bart = bart

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy of ``labels`` (``-100`` = ignored) given ``(B, P, D)`` embeddings."""
        return self.bart(inputs_embeds=self.bridge(embeddings), labels=labels).loss

    @torch.no_grad()
    def generate(self, embeddings: torch.Tensor, max_new_tokens: int, num_beams: int = 1) -> torch.Tensor:
        """Free-running decoding (no teacher forcing) from ``(B, P, D)`` embeddings."""
        inputs = self.bridge(embeddings)
        attention = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
        return self.bart.generate(inputs_embeds=inputs, attention_mask=attention, max_new_tokens=max_new_tokens,
                                  num_beams=num_beams, do_sample=False)

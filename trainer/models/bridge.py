"""EEG-to-text model: encoder features -> normalising Linear bridge -> BART via ``inputs_embeds``.

Phase 1 of Stage 2 trains :class:`EEGToText` on cached encoder features
(:meth:`MultiViewEncoder.patch_features`); phase 2 attaches the encoder
(:meth:`EEGToText.attach_encoder`) and trains from raw windows end to end. The parameter names
are those of the exported model file, whose standalone loader rebuilds the same computation.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration

from trainer.config import BartPreset


class Bridge(nn.Module):
    """Standardises encoder features, projects them to BART's width and layer-normalises them.

    The per-(patch, feature) mean and standard deviation are fixed buffers taken from the
    training sentences' cached features: they remove each token's constant offset (its channel,
    patch and view embeddings), which would otherwise dominate the projection, and they stay
    fixed in phase 2 so the encoder's updates are seen on the same scale. The LayerNorm puts
    the result on the scale BART's own token embeddings have.
    """

    def __init__(self, n_patches: int, feature_dim: int, bart_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_patches, feature_dim))
        self.register_buffer("std", torch.ones(n_patches, feature_dim))
        self.proj = nn.Linear(feature_dim, bart_dim)
        self.norm = nn.LayerNorm(bart_dim)

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-5))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj((features - self.mean) / self.std))


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
    """Bridge + BART, and in phase 2 the encoder (``self.encoder``, ``None`` while frozen).

    ``forward`` and ``generate`` take either cached features ``(B, P, F)`` (no encoder
    attached) or raw windows ``(B, C, T)`` with their channel masks (encoder attached).
    """

    def __init__(self, n_patches: int, feature_dim: int, bart: BartForConditionalGeneration) -> None:
        super().__init__()
        self.bridge = Bridge(n_patches, feature_dim, bart.config.d_model)
        self.bart = bart
        self.encoder: nn.Module | None = None

    def attach_encoder(self, encoder: nn.Module) -> None:
        """Phase 2: the encoder becomes part of the model (its weights are in the state dict)."""
        self.encoder = encoder

    def inputs_embeds(self, inputs: torch.Tensor, channel_mask: torch.Tensor | None = None) -> torch.Tensor:
        features = inputs if self.encoder is None else self.encoder.patch_features(inputs, channel_mask)
        return self.bridge(features)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, channel_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Teacher-forced cross-entropy of ``labels`` (``-100`` = ignored)."""
        return self.bart(inputs_embeds=self.inputs_embeds(inputs, channel_mask), labels=labels).loss

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor, max_new_tokens: int, num_beams: int = 1,
                 channel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Free-running decoding (no teacher forcing)."""
        embeds = self.inputs_embeds(inputs, channel_mask)
        attention = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return self.bart.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=max_new_tokens,
                                  num_beams=num_beams, do_sample=False)

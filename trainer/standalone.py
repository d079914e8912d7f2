"""Load a NeuroLens Stage 2 model file and write text from EEG, without NeuroLens installed.

This file is self-contained on purpose: it imports only torch, safetensors and transformers, and
its source travels inside every Stage 2 model file (metadata key ``loader``), so whoever has the
file has the code that reads it. Usage::

    from safetensors import safe_open
    with safe_open("model.safetensors", "pt") as f:
        open("neurolens_loader.py", "w").write(f.metadata()["loader"])
    import neurolens_loader
    model = neurolens_loader.load("model.safetensors")
    print(model.generate(eeg))          # eeg: (batch, channels, samples), preprocessed as below

Input: windows of ``model.window_samples`` samples at ``model.sfreq`` Hz starting at a
sentence's onset, channels in the order of ``model.channels`` (absent ones zero, with
``channel_mask`` False), average-referenced, band-passed 0.5-40 Hz, each channel scaled by its
median and inter-quartile range over the whole recording (``(x - median) / (IQR / 1.349)``),
which is what NeuroLens's trainer feeds the model.

The encoder below recomputes NeuroLens's MultiView encoder with the same parameter names; the
trainer's test suite checks that the two agree on the same weights.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

N_VIEWS = 2


class Encoder(nn.Module):
    """MultiView encoder: (channel, patch) tokens in a temporal and a spectral view, per patch
    the view-averaged channel states side by side, ``(B, P, C·D)``."""

    def __init__(self, config: dict, electrode_pos: torch.Tensor) -> None:
        super().__init__()
        self.patch_samples = config["patch_samples"]
        c, d = len(config["channels"]), config["d_model"]
        self.n_patches = int(round(config["window_s"] * config["sfreq"])) // self.patch_samples
        self.temporal = nn.Linear(self.patch_samples, d)
        self.spectral = nn.Linear(self.patch_samples // 2 + 1, d)
        self.channel_embed = nn.Embedding(c, d)
        self.position_proj = nn.Linear(3, d)
        self.patch_embed = nn.Embedding(self.n_patches, d)
        self.view_embed = nn.Embedding(N_VIEWS, d)
        self.mask_token = nn.Parameter(torch.zeros(N_VIEWS, d))
        self.register_buffer("electrode_pos", electrode_pos, persistent=False)
        layer = nn.TransformerEncoderLayer(d, config["n_heads"], config["d_ff"], 0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config["n_layers"], enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, channel_mask: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        p = t // self.patch_samples
        patches = x.reshape(b, c, p, self.patch_samples)
        spectrum = torch.log1p(torch.fft.rfft(patches, dim=-1).abs())
        views = torch.stack([self.temporal(patches), self.spectral(spectrum)], dim=1)        # (B, V, C, P, D)
        spatial = self.channel_embed.weight + self.position_proj(self.electrode_pos)
        tokens = (views + spatial[None, None, :, None, :] + self.patch_embed.weight[None, None, None, :, :]
                  + self.view_embed.weight[None, :, None, None, :]).flatten(1, 3)
        padding = (~channel_mask.bool())[:, None, :, None].expand(-1, N_VIEWS, -1, p).flatten(1)
        hidden = tokens
        for layer in self.blocks.layers:
            hidden = layer(hidden, src_key_padding_mask=padding)
        states = self.norm(hidden).reshape(b, N_VIEWS, c, p, -1).mean(dim=1)
        states = states * channel_mask.to(states.dtype)[:, :, None, None]
        return states.permute(0, 2, 1, 3).flatten(2)


class Bridge(nn.Module):
    """Standardise the features with the training set's statistics, project to BART's width."""

    def __init__(self, n_patches: int, feature_dim: int, bart_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_patches, feature_dim))
        self.register_buffer("std", torch.ones(n_patches, feature_dim))
        self.proj = nn.Linear(feature_dim, bart_dim)
        self.norm = nn.LayerNorm(bart_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj((features - self.mean) / self.std))


class EEGToTextModel(nn.Module):
    """Encoder -> bridge -> BART, and the tokenizer that turns BART's ids into text."""

    def __init__(self, encoder: Encoder, bridge: Bridge, bart: BartForConditionalGeneration,
                 tokenizer: PreTrainedTokenizerFast, encoder_config: dict) -> None:
        super().__init__()
        self.encoder, self.bridge, self.bart, self.tokenizer = encoder, bridge, bart, tokenizer
        self.channels = list(encoder_config["channels"])
        self.sfreq = float(encoder_config["sfreq"])
        self.window_samples = int(round(encoder_config["window_s"] * encoder_config["sfreq"]))

    @torch.no_grad()
    def generate(self, eeg, channel_mask=None, max_new_tokens: int | None = None, num_beams: int = 1) -> list[str]:
        """Free-running decoding of a batch of windows ``(B, C, T)``; one sentence per window.

        ``max_new_tokens`` defaults to (and is capped at) what BART's position table allows.
        """
        limit = self.bart.config.max_position_embeddings - 1  # the decoder start token takes one
        max_new_tokens = limit if max_new_tokens is None else min(max_new_tokens, limit)
        x = torch.as_tensor(eeg, dtype=torch.float32)
        if x.ndim == 2:
            x = x[None]
        mask = (torch.ones(x.shape[:2], dtype=torch.bool) if channel_mask is None
                else torch.as_tensor(channel_mask, dtype=torch.bool).reshape(x.shape[:2]))
        embeds = self.bridge(self.encoder(x, mask))
        attention = torch.ones(embeds.shape[:2], dtype=torch.long)
        ids = self.bart.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 num_beams=num_beams, do_sample=False)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def load(path: str) -> EEGToTextModel:
    """Build the model of a Stage 2 model file (format ``neurolens.model/1``), in eval mode."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != "neurolens.model/1":
            raise ValueError(f"{path} is not a NeuroLens model file (format {meta.get('format')!r}).")
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    for alias, name in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[name]

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    encoder_config = json.loads(meta["encoder_config"])
    encoder_weights = part("encoder.")
    encoder = Encoder(encoder_config, encoder_weights.pop("electrode_pos"))
    encoder.load_state_dict(encoder_weights)
    bridge_weights = part("bridge.")
    bridge = Bridge(*bridge_weights["mean"].shape, bridge_weights["proj.weight"].shape[0])
    bridge.load_state_dict(bridge_weights)
    bart = BartForConditionalGeneration(BartConfig.from_dict(json.loads(meta["bart_config"])))
    bart.load_state_dict(part("bart."))
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(meta["tokenizer"]), bos_token="<s>",
                                        pad_token="<pad>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>")
    return EEGToTextModel(encoder, bridge, bart, tokenizer, encoder_config).eval()

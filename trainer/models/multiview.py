"""MultiView Transformer EEG encoder and its self-supervised head.

A window ``x`` of shape ``(B, C, T)`` is cut into ``P = T / patch_samples`` patches per channel.
Each (channel, patch) gives one token per view:

- temporal view: the patch's raw samples through a Linear layer;
- spectral view: the log-magnitude rFFT of the patch (``n_freq_bins`` values) through a Linear;

and every token also gets the spatial view of its channel (a learned channel-identity embedding
plus a small projection of the electrode's 3-D 10-20 position), a patch-position embedding and
a view embedding. The ``2·C·P`` tokens form one sequence through pre-LN transformer blocks;
missing channels are a key-padding mask, so they neither attend nor are attended to.

The SSL head (:class:`SSLHead`) is a separate module that Stage 1 trains and drops from the
exported encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.config import EncoderConfig
from trainer.data.montage import channel_positions

N_VIEWS = 2  # temporal, spectral


def patchify(x: torch.Tensor, patch_samples: int) -> torch.Tensor:
    """``(B, C, T)`` -> ``(B, C, P, patch_samples)``."""
    b, c, t = x.shape
    return x.reshape(b, c, t // patch_samples, patch_samples)


def patch_spectrum(patches: torch.Tensor) -> torch.Tensor:
    """Log-magnitude spectrum of each patch, ``(..., S)`` -> ``(..., S // 2 + 1)``."""
    return torch.log1p(torch.fft.rfft(patches, dim=-1).abs())


class MultiViewEncoder(nn.Module):
    """The Stage 1 encoder; see the module docstring for the token layout.

    Parameters
    ----------
    config : EncoderConfig
        Channels, sampling rate, patching and transformer sizes.
    activation_checkpointing : bool
        Recompute each block's activations during backward instead of keeping them (training
        only; a training choice, not part of the architecture, so not in the config).
    """

    def __init__(self, config: EncoderConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        c, p, d = len(config.channels), config.n_patches, config.d_model
        self.temporal = nn.Linear(config.patch_samples, d)
        self.spectral = nn.Linear(config.n_freq_bins, d)
        self.channel_embed = nn.Embedding(c, d)
        self.position_proj = nn.Linear(3, d)
        self.patch_embed = nn.Embedding(p, d)
        self.view_embed = nn.Embedding(N_VIEWS, d)
        self.mask_token = nn.Parameter(torch.zeros(N_VIEWS, d))
        # Positions in metres are ~0.1; scaling by 10 puts them in a unit range.
        self.register_buffer("electrode_pos", torch.from_numpy(channel_positions(tuple(config.channels)) * 10.0),
                             persistent=False)
        layer = nn.TransformerEncoderLayer(d, config.n_heads, config.d_ff, config.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.mask_token, std=0.02)

    def _tokens(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        patches = patchify(x, cfg.patch_samples)                           # (B, C, P, S)
        views = torch.stack([self.temporal(patches), self.spectral(patch_spectrum(patches))], dim=1)
        if token_mask is not None:                                         # (B, C, P) True = hidden
            hide = token_mask[:, None, :, :, None]
            views = torch.where(hide, self.mask_token[None, :, None, None, :].to(views.dtype), views)
        spatial = self.channel_embed.weight + self.position_proj(self.electrode_pos)     # (C, D)
        tokens = (views + spatial[None, None, :, None, :] + self.patch_embed.weight[None, None, None, :, :]
                  + self.view_embed.weight[None, :, None, None, :])        # (B, V, C, P, D)
        return tokens.flatten(1, 3)

    def forward(self, x: torch.Tensor, channel_mask: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token states.

        Parameters
        ----------
        x : Tensor
            EEG windows, ``(B, C, T)``.
        channel_mask : Tensor, optional
            ``(B, C)`` bool, True where the channel is present; absent channels are masked out
            of attention.
        token_mask : Tensor, optional
            ``(B, C, P)`` bool, True for tokens whose content is replaced by the mask embedding.

        Returns
        -------
        Tensor
            ``(B, 2·C·P, D)``, ordered (view, channel, patch).
        """
        tokens = self._tokens(x, token_mask)
        padding = None
        if channel_mask is not None:
            p = self.config.n_patches
            absent = ~channel_mask.bool()                                  # (B, C)
            padding = absent[:, None, :, None].expand(-1, N_VIEWS, -1, p).flatten(1)
        hidden = tokens
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.blocks.layers:  # the same computation as self.blocks(...), layer by layer
            if checkpointing:
                # Only the block's input is kept; its attention and feed-forward activations are
                # recomputed during backward. Costs one more forward, saves most activation memory.
                hidden = checkpoint(layer, hidden, None, padding, use_reentrant=False)
            else:
                hidden = layer(hidden, src_key_padding_mask=padding)
        return self.norm(hidden)

    def states(self, x: torch.Tensor, channel_mask: torch.Tensor | None = None,
               token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token states reshaped to ``(B, V, C, P, D)``."""
        b, c = x.shape[:2]
        return self.forward(x, channel_mask, token_mask).reshape(b, N_VIEWS, c, self.config.n_patches, -1)

    def embed(self, x: torch.Tensor, channel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One embedding per time patch, ``(B, P, D)``: mean over views and present channels."""
        states = self.states(x, channel_mask)
        if channel_mask is None:
            return states.mean(dim=(1, 2))
        weight = channel_mask.to(states.dtype)[:, None, :, None, None]
        return (states * weight).sum(dim=(1, 2)) / (weight.sum(dim=(1, 2)) * N_VIEWS).clamp_min(1.0)


    def patch_features(self, x: torch.Tensor, channel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 2's view of a window: per time patch, every channel's token, ``(B, P, C·D)``.

        The two views of a (channel, patch) are averaged, absent channels are zeroed, and the
        channels of each patch are laid side by side, so the scalp pattern that tells one word's
        response from another's is kept (pooling over channels, as :meth:`embed` does, would
        average it away) while BART sees one input per time patch.
        """
        states = self.states(x, channel_mask).mean(dim=1)                  # (B, C, P, D)
        if channel_mask is not None:
            states = states * channel_mask.to(states.dtype)[:, :, None, None]
        return states.permute(0, 2, 1, 3).flatten(2)


class SSLHead(nn.Module):
    """Masked patch reconstruction (signal and spectrum) plus cross-view agreement.

    A shared MLP on top of the token states predicts, for masked tokens, the normalised raw
    patch and the normalised log spectrum; with ``visible_weight`` > 0 it also reconstructs the
    visible tokens, at that weight. Without that term nothing constrains the final states of
    visible tokens (only masked positions are scored), and those are exactly the states a
    downstream user reads, since nothing is masked then: measured on the word probe, they
    drifted away from the signal's content and grouped same-word windows worse than a
    random-init encoder does. The agreement term is a symmetric InfoNCE between the
    pooled temporal-view and spectral-view embeddings of the same window (other windows of the
    batch are the negatives), which pushes both views toward the same content.

    The decorrelation term (:func:`decorrelation_penalty`, weight ``decorrelation_weight``)
    asks the final token states to have unit variance and uncorrelated dimensions over the
    batch's tokens. Reconstruction alone keeps the states a near-linear copy of the signal, and
    the geometry of the signal is ruled by its strongest component: EEG's 1/f background. A
    random-init encoder is such a copy too, so the two grouped same-word windows equally
    badly. Whitened states give every direction the same say, which is what the background
    had taken from the word responses (measured in DESIGN.md, "Why masked reconstruction could
    not beat random init").
    """

    def __init__(self, config: EncoderConfig, agreement_dim: int = 128, temperature: float = 0.1) -> None:
        super().__init__()
        d = config.d_model
        self.config = config
        self.temperature = temperature
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU())
        self.to_signal = nn.Linear(d, config.patch_samples)
        self.to_spectrum = nn.Linear(d, config.n_freq_bins)
        self.agree = nn.Linear(d, agreement_dim)

    @staticmethod
    def _standardise(values: torch.Tensor) -> torch.Tensor:
        return (values - values.mean(-1, keepdim=True)) / (values.std(-1, keepdim=True) + 1e-5)

    def forward(self, encoder: MultiViewEncoder, x: torch.Tensor, channel_mask: torch.Tensor,
                token_mask: torch.Tensor, agreement_weight: float, visible_weight: float = 0.0,
                decorrelation_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch and its parts.

        Parameters
        ----------
        encoder : MultiViewEncoder
        x : Tensor
            ``(B, C, T)`` windows.
        channel_mask : Tensor
            ``(B, C)`` bool, True where present.
        token_mask : Tensor
            ``(B, C, P)`` bool, True for masked (to be reconstructed) tokens.
        agreement_weight : float
            Weight of the cross-view InfoNCE term.
        visible_weight : float
            Weight of a visible token's reconstruction relative to a masked one's (0: masked only).
        decorrelation_weight : float
            Weight of :func:`decorrelation_penalty` on the token states of present channels.

        Returns
        -------
        loss : Tensor
            Scalar training loss.
        parts : dict of str to float
            ``signal``, ``spectrum``, ``agreement`` and ``decorrelation`` terms, for logging.
        """
        states = encoder.states(x, channel_mask, token_mask)               # (B, V, C, P, D)
        hidden = self.mlp(states)
        patches = patchify(x, self.config.patch_samples)
        target_signal = self._standardise(patches)
        target_spectrum = self._standardise(patch_spectrum(patches))
        # Both views' states predict both targets: each view must recover what was hidden.
        pred_signal = self.to_signal(hidden)                               # (B, V, C, P, S)
        pred_spectrum = self.to_spectrum(hidden)
        weight = token_mask.to(x.dtype) + visible_weight * (~token_mask).to(x.dtype)
        selected = (weight * channel_mask[:, :, None].to(x.dtype))[:, None, :, :, None]
        denom = (selected.sum() * N_VIEWS).clamp_min(1e-6)
        signal = (((pred_signal - target_signal[:, None]) ** 2).mean(-1, keepdim=True) * selected).sum() / denom
        spectrum = (((pred_spectrum - target_spectrum[:, None]) ** 2).mean(-1, keepdim=True) * selected).sum() / denom

        present = channel_mask.to(x.dtype)[:, :, None, None]
        count = (present.sum(dim=(1, 2, 3)) * self.config.n_patches).clamp_min(1.0)
        pooled = (states * present[:, None]).sum(dim=(2, 3)) / count[:, None, None]   # (B, V, D)
        z = F.normalize(self.agree(pooled), dim=-1)                        # (B, V, A)
        logits = z[:, 0] @ z[:, 1].T / self.temperature
        labels = torch.arange(x.shape[0], device=x.device)
        agreement = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

        present_tokens = channel_mask[:, None, :, None].expand(states.shape[:-1])   # (B, V, C, P)
        decorrelation = decorrelation_penalty(states[present_tokens])

        loss = signal + spectrum + agreement_weight * agreement + decorrelation_weight * decorrelation
        return loss, {"signal": signal.item(), "spectrum": spectrum.item(), "agreement": agreement.item(),
                      "decorrelation": decorrelation.item()}


def decorrelation_penalty(tokens: torch.Tensor) -> torch.Tensor:
    """How far ``(N, D)`` token states are from unit variance and uncorrelated dimensions.

    The variance and covariance terms of VICReg (Bardes et al., 2022), over the tokens of a
    batch: the mean over dimensions of ``relu(1 - std)``, plus the sum of squared off-diagonal
    covariances divided by ``D``. Zero for whitened states; computed in float32 under autocast,
    since a bfloat16 covariance of a thousand tokens loses the small correlations it penalises.
    """
    tokens = tokens.float()
    if len(tokens) < 2:
        return tokens.sum() * 0.0
    centred = tokens - tokens.mean(0)
    cov = centred.T @ centred / (len(tokens) - 1)
    variance = torch.diagonal(cov)
    spread = F.relu(1.0 - torch.sqrt(variance + 1e-4)).mean()
    off_diagonal = (cov ** 2).sum() - (variance ** 2).sum()
    return spread + off_diagonal / cov.shape[0]


def random_token_mask(batch: int, config: EncoderConfig, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """``(batch, C, P)`` bool mask hiding ``ratio`` of the tokens of each window, at random."""
    c, p = len(config.channels), config.n_patches
    scores = torch.rand(batch, c * p, generator=generator)
    k = max(1, int(round(ratio * c * p)))
    idx = scores.argsort(dim=1)[:, :k]
    mask = torch.zeros(batch, c * p, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask.reshape(batch, c, p)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

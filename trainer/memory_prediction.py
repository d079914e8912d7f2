"""Predicted peak memory of a training job, before it starts: RAM per trainer process and GPU.

The server admits a job only when its prediction fits what the machine has free (and refuses one
that could never fit), so this module is imported by the server and must stay free of torch,
numpy and every other heavy dependency, like :mod:`trainer.config`.

The estimate is deliberately simple: the Python + torch + MNE runtime baseline, plus weights,
gradients and optimizer state by parameter count, plus activations by tokens in flight. Issue 7
checks it against measured peaks (tests/test_memory_prediction*.py, bench/memory_stage*.py).
Stage 1 has its own, phase by phase (:func:`_predict_stage1_peak_bytes`).
"""

from __future__ import annotations

import math

from trainer.config import EncoderConfig, Stage1Config, Stage2Config, TrainConfigBase

STAGE1_BASELINE_BYTES = 550 * 10**6
"""What a Stage 1 trainer holds besides the model: the interpreter with torch, MNE, SciPy and
NumPy loaded, the code pages of the filtering, FFT and BLAS routines and their work buffers,
the allocator's caches, the preprocessed data's pages, and the event reporter. Measured on
Linux x86-64: 526-547 MB for the tiny preset (whose model is negligible), 624 MB for small; the
large preset's runs sit ~80 MB higher than weights + state + activations predict (allocator
overhead that grows with the model). 550 MB splits the difference: tiny +7%, large -8%."""
# Adafactor's state per parameter: the row and column second moments of each matrix
# (m + n floats for m x n weights) plus full moments for the few vectors (biases, norms).
_ADAFACTOR_STATE_BYTES_PER_PARAM = 0.05


def _predict_stage1_peak_bytes(config: Stage1Config) -> int:
    """Peak RSS of a Stage 1 trainer: the baseline plus the largest of its three phases.

    - training: weights (4 bytes a parameter), optimizer state (AdamW 8, Adafactor about 0.05),
      gradients (4 when a plain loop holds them all; 0 when the step is fused into backward,
      2 or 4 for the accumulation buffers when micro-batches are accumulated), and the
      activations of one micro-batch: every block's input kept when checkpointing plus one
      block's internals recomputed, or every block's internals without checkpointing. A block's
      internals per window are about 16 d_model + 2 d_ff floats per token (projections, norms,
      the feed-forward's hidden layer and GELU); attention goes through PyTorch's fused
      scaled-dot-product kernel, which keeps no tokens x tokens score matrix;
    - probe start: the trained model and optimizer still held, with the probe's windows and the
      trained encoder's features (``probe_words`` x channels x patches-in-0.5-s x d_model);
    - probe finish: the random-init encoder in place of the trained one (released first), both
      feature matrices, and the standardised float32 copies the ridge fit makes of one of them.

    ``probe_words`` is used as the probe's size; a dataset with fewer words needs less, so the
    probe's share is an upper bound.
    """
    enc = config.encoder
    params = enc.approx_parameters()
    tokens = 2 * len(enc.channels) * enc.n_patches
    block = tokens * (16 * enc.d_model + 2 * enc.d_ff) * 4
    kept_inputs = tokens * enc.d_model * 4 * enc.n_layers
    per_window = kept_inputs + block if config.activation_checkpointing else block * enc.n_layers
    activations = config.micro_batch_size * per_window
    if not config.fused_optimizer or config.devices > 1:
        grads = 4.0  # all gradients at once (data-parallel: averaged across processes first)
    elif config.accumulation_steps > 1:
        grads = 2.0 if config.accumulate_dtype == "bfloat16" else 4.0
    else:
        grads = 0.0  # a parameter's gradient lives only until its hook has stepped it
    state = 8.0 if config.optimizer == "adamw" else _ADAFACTOR_STATE_BYTES_PER_PARAM
    training = params * (4 + state + grads) + activations

    probe = 0
    if config.probe_words:
        probe_patches = min(enc.n_patches, math.ceil(0.5 * enc.sfreq / enc.patch_samples))
        features = config.probe_words * len(enc.channels) * probe_patches * enc.d_model * 4
        probe_windows = config.probe_words * len(enc.channels) * enc.window_samples * 4
        inference = config.micro_batch_size * block  # the probe runs micro-batches through an encoder
        probe_start = params * (4 + state) + probe_windows + features + inference
        probe_finish = params * 4 + probe_windows + 3 * features + inference
        probe = max(probe_start, probe_finish)
    return int(STAGE1_BASELINE_BYTES + max(training, probe))


# The interpreter and libraries of a Stage 2 trainer (Stage 1 has its own measured baseline above).
RUNTIME_BASELINE_BYTES = 450 * 1024**2
# fp32 bytes per parameter: weights 4; gradients 4 when held all at once (plain loop); optimizer
# state 8 for AdamW (two moments) and about 1 for Adafactor (factored rows and columns).
_STATE_BYTES_PER_PARAM = {"adamw": 8, "adafactor": 1}


def predict_peak_bytes(config: TrainConfigBase, encoder: EncoderConfig | None = None) -> int:
    """Predicted peak RSS of a trainer running ``config``, in bytes.

    ``encoder`` is the encoder a Stage 2 job starts from (its size matters as much as BART's);
    unknown, the ``tiny`` preset is assumed.
    """
    if isinstance(config, Stage1Config):
        return _predict_stage1_peak_bytes(config)
    assert isinstance(config, Stage2Config)
    return _predict_stage2_peak_bytes(config, encoder or EncoderConfig.from_name("tiny"))


# Most bytes of encoder activations one batch may use while Stage 2 caches the encoder's outputs.
EMBEDDING_BATCH_BYTES = 128 * 1024**2


def inference_bytes_per_window(enc: EncoderConfig) -> int:
    """Activation bytes one window needs in an encoder forward without gradients (one block's
    hidden states, feed-forward and attention scores live at a time)."""
    tokens = 2 * len(enc.channels) * enc.n_patches
    return tokens * (4 * enc.d_model + enc.d_ff) * 4 + enc.n_heads * tokens * tokens * 4


def embedding_batch(enc: EncoderConfig) -> int:
    """Windows per encoder forward when Stage 2 caches features: 64, fewer for large encoders."""
    return max(1, min(64, EMBEDDING_BATCH_BYTES // inference_bytes_per_window(enc)))


# Stage 2 imports transformers and tokenizers and runs BART's generate(): measured about 100 MB
# above Stage 1's runtime with the tiny presets.
STAGE2_RUNTIME_EXTRA_BYTES = 100 * 1024**2


def _predict_stage2_peak_bytes(config: Stage2Config, enc: EncoderConfig) -> int:
    """Stage 2's peak: the largest of its three parts, which never overlap in time.

    - caching: the encoder's weights and one inference batch (64 windows) of its activations;
    - phase 1: BART and the bridge with their gradients and optimizer state, and BART's
      activations (the cached features are read a batch at a time and released);
    - phase 2 (``unfreeze_steps`` > 0): phase 1 plus the encoder trained like Stage 1.
    """
    bart = config.bart
    features = len(enc.channels) * enc.d_model           # one BART input per time patch
    trainable = bart.approx_parameters() + features * bart.d_model + 2 * enc.n_patches * features
    if not config.fused_optimizer:
        grads = 4
    elif config.accumulation_steps > 1:
        grads = 2 if config.accumulate_dtype == "bfloat16" else 4
    else:
        grads = 0
    per_param = 4 + grads + _STATE_BYTES_PER_PARAM[config.optimizer]
    tokens = enc.n_patches + config.max_target_tokens
    layers = bart.encoder_layers + bart.decoder_layers
    bart_activations = config.micro_batch_size * tokens * layers * (bart.d_model * 16 + bart.ffn_dim * 2) * 4
    logits = config.micro_batch_size * config.max_target_tokens * bart.vocab_size * 4 * 3
    phase1 = trainable * per_param + bart_activations + logits
    enc_params = enc.approx_parameters()
    enc_tokens = 2 * len(enc.channels) * enc.n_patches
    enc_layer = enc_tokens * (enc.d_model * 16 + enc.d_ff * 2) * 4
    caching = enc_params * 4 + embedding_batch(enc) * inference_bytes_per_window(enc)
    peak = max(caching, phase1)
    if config.unfreeze_steps:
        enc_activations = config.micro_batch_size * (
            enc_tokens * enc.d_model * 4 * enc.n_layers + enc_layer if config.activation_checkpointing
            else enc_layer * enc.n_layers)
        peak = max(peak, phase1 + enc_params * per_param + enc_activations)
    return int(RUNTIME_BASELINE_BYTES + STAGE2_RUNTIME_EXTRA_BYTES + peak)


# CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's slack on one GPU.
CUDA_OVERHEAD_BYTES = 600 * 1024**2


def predict_gpu_bytes(config: TrainConfigBase, encoder: EncoderConfig | None = None) -> int:
    """Predicted peak GPU memory of each process of a CUDA job, in bytes.

    The same weights, gradients, optimizer state and activations as :func:`predict_peak_bytes`
    (bf16 autocast only shrinks the activations, so this errs high), on the GPU instead of in
    the process's RAM, plus the CUDA runtime's own overhead in place of the interpreter's.
    """
    host = (STAGE1_BASELINE_BYTES if isinstance(config, Stage1Config)
            else RUNTIME_BASELINE_BYTES + STAGE2_RUNTIME_EXTRA_BYTES)
    return predict_peak_bytes(config, encoder) - host + CUDA_OVERHEAD_BYTES

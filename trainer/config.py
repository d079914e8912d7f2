"""Training configuration: encoder and BART presets, and each stage's job config.

This module is imported by the server to validate job configs before anything is queued, so it
must stay free of torch, numpy and every other heavy dependency: plain dataclasses only.

A job's ``config`` (the JSON object POSTed to ``/api/jobs``) becomes its stage's config class
(:func:`trainer.stages.parse_config` picks it from the registry); every bad value raises
:class:`ConfigError` with a message that names the field and the allowed values. What a config
is predicted to need in memory is :mod:`trainer.memory_prediction`'s.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

# The encoder's channel set: the 32-channel 10-20 layout most research caps use. Recordings are
# mapped onto it by name; missing channels are masked and extra ones dropped.
CHANNELS_32 = (
    "Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "FC5", "FC1", "FC2", "FC6", "T7", "C3", "Cz",
    "C4", "T8", "TP9", "CP5", "CP1", "CP2", "CP6", "TP10", "P7", "P3", "Pz", "P4", "P8", "PO9",
    "O1", "Oz", "O2", "PO10",
)
# The tiny preset keeps 8 central channels so that tests and the demo train in seconds.
CHANNELS_8 = ("F3", "Fz", "F4", "C3", "Cz", "C4", "P3", "Pz")


class ConfigError(ValueError):
    """A job config value is invalid; the message names the field and what is allowed."""


def expect_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` naming ``allowed`` unless ``value`` is one of them."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"
        if len(allowed) == 1:
            choices = repr(allowed[0])
        raise ConfigError(f"Invalid {name} {value!r}; expected {choices}.")


# Counts beyond this are certainly typos, and would overflow the database's integer columns.
MAX_COUNT = 2**31 - 1


def _expect_positive(name: str, value: Any, *, integer: bool = True, allow_zero: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ConfigError(f"Invalid {name} {value!r}; expected a {'whole number' if integer else 'finite number'}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "greater than zero"
        raise ConfigError(f"Invalid {name} {value!r}; it must be {bound}.")
    if value > MAX_COUNT:
        raise ConfigError(f"Invalid {name} {value!r}; it must be at most {MAX_COUNT}.")


def _expect_in_range(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"Invalid {name} {_short(value)}; expected a whole number from {low} to {high}.")


def _short(value: Any) -> str:
    """``repr`` of a value for a message, cut short: declared configs come from untrusted files."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


MIN_LOG_EVERY_S = 0.2
"""Shortest interval between progress events: each one is a database row and a job update."""

MAX_DEVICES = 64
"""Most data-parallel processes a job may ask for (a sanity bound, not a tested scale)."""


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of the MultiView Transformer EEG encoder; saved beside every checkpoint."""

    name: str = "tiny"
    """Preset name this config was built from."""
    channels: tuple[str, ...] = CHANNELS_8
    """Electrode names the encoder expects, in order (10-20 names)."""
    sfreq: float = 128.0
    """Sampling rate in Hz that recordings are resampled to."""
    window_s: float = 2.0
    """Length of one training window in seconds."""
    patch_samples: int = 32
    """Samples per temporal patch; each (channel, patch) becomes one token per view."""
    d_model: int = 64
    """Transformer width."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block."""
    d_ff: int = 128
    """Feed-forward hidden width."""
    dropout: float = 0.0
    """Dropout inside the transformer blocks."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(channels=CHANNELS_8, d_model=64, n_layers=2, n_heads=4, d_ff=128),
        "small": dict(channels=CHANNELS_32, d_model=256, n_layers=4, n_heads=4, d_ff=1024),
        "base": dict(channels=CHANNELS_32, d_model=512, n_layers=8, n_heads=8, d_ff=2048),
        # About 270M parameters: 21 blocks of 12.6M plus embeddings, the seed's size.
        "large": dict(channels=CHANNELS_32, d_model=1024, n_layers=21, n_heads=16, d_ff=4096),
    }

    # What a declared config (an uploaded file's, above all) may ask for: well above the large
    # preset, and small enough that building the modules, even on torch's meta device, costs
    # seconds and little memory. Each is a field of the dataclass, with its inclusive range.
    BOUNDS: ClassVar[dict[str, tuple[int, int]]] = {
        "patch_samples": (1, 4096), "d_model": (1, 8192), "n_layers": (1, 96), "n_heads": (1, 256),
        "d_ff": (1, 65536),
    }
    MAX_CHANNELS: ClassVar[int] = 256
    MAX_WINDOW_SAMPLES: ClassVar[int] = 1 << 16
    MAX_TOKENS: ClassVar[int] = 1 << 16
    """Most (channel, patch) tokens in one window."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"Invalid encoder name {self.name!r}; expected a string.")
        if (not isinstance(self.channels, tuple) or not 1 <= len(self.channels) <= self.MAX_CHANNELS
                or not all(isinstance(ch, str) and 0 < len(ch) <= 32 for ch in self.channels)):
            raise ConfigError(f"Invalid channels {_short(self.channels)}; expected 1 to {self.MAX_CHANNELS} "
                              f"electrode names (strings of at most 32 characters).")
        if len(set(self.channels)) != len(self.channels):
            raise ConfigError(f"Invalid channels {_short(self.channels)}; each electrode may appear once.")
        for name, (low, high) in self.BOUNDS.items():
            _expect_in_range(name, getattr(self, name), low, high)
        _expect_positive("sfreq", self.sfreq, integer=False)
        _expect_positive("window_s", self.window_s, integer=False)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"Invalid dropout {self.dropout!r}; expected a number from 0 up to (not including) 1.")
        if not 1 <= self.window_samples <= self.MAX_WINDOW_SAMPLES:
            raise ConfigError(f"Invalid window: {self.window_s!r} s at {self.sfreq!r} Hz is {self.window_samples} "
                              f"samples; expected 1 to {self.MAX_WINDOW_SAMPLES}.")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}.")
        if self.window_samples % self.patch_samples:
            raise ConfigError(
                f"window of {self.window_samples} samples is not a whole number of "
                f"{self.patch_samples}-sample patches."
            )
        if len(self.channels) * self.n_patches > self.MAX_TOKENS:
            raise ConfigError(f"Invalid encoder: {len(self.channels)} channels x {self.n_patches} patches is more "
                              f"than {self.MAX_TOKENS} tokens per window.")

    @classmethod
    def from_name(cls, name: str) -> "EncoderConfig":
        expect_choice("preset", name, tuple(cls.PRESETS))
        return cls(name=name, **cls.PRESETS[name])

    @classmethod
    def from_dict(cls, data: Any) -> "EncoderConfig":
        """The config a saved ``encoder_config`` object describes (unknown keys are ignored).

        Raises
        ------
        ConfigError
            ``data`` is not an object, or a value is out of range; the message names it.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"Invalid encoder config {_short(data)}; expected a JSON object of encoder fields.")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "channels" in values:
            if not isinstance(values["channels"], list | tuple):
                raise ConfigError(f"Invalid channels {_short(values['channels'])}; expected a list of electrode names.")
            values["channels"] = tuple(values["channels"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["channels"] = list(self.channels)
        return data

    @property
    def window_samples(self) -> int:
        return int(round(self.window_s * self.sfreq))

    @property
    def n_patches(self) -> int:
        return self.window_samples // self.patch_samples

    @property
    def n_freq_bins(self) -> int:
        return self.patch_samples // 2 + 1

    def approx_parameters(self) -> int:
        """Parameter count of the encoder body, within a few percent of the real module."""
        per_block = 4 * self.d_model * self.d_model + 2 * self.d_model * self.d_ff
        embeddings = (self.patch_samples + self.n_freq_bins + len(self.channels) + self.n_patches + 8) * self.d_model
        return self.n_layers * per_block + embeddings


@dataclass(frozen=True)
class BartPreset:
    """Size of the BART encoder-decoder built from a config in Stage 2."""

    d_model: int
    encoder_layers: int
    decoder_layers: int
    attention_heads: int
    ffn_dim: int
    vocab_size: int

    def approx_parameters(self) -> int:
        layers = self.encoder_layers + self.decoder_layers * 1.5  # decoder blocks add cross-attention
        per_block = 4 * self.d_model * self.d_model + 2 * self.d_model * self.ffn_dim
        return int(layers * per_block + self.vocab_size * self.d_model)


# What a saved ``bart_config`` (a transformers BartConfig as JSON) may declare, checked before
# transformers builds anything from it: the field, its inclusive range.
BART_BOUNDS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1_000_000), "d_model": (1, 8192), "encoder_layers": (1, 64), "decoder_layers": (1, 64),
    "encoder_attention_heads": (1, 256), "decoder_attention_heads": (1, 256), "encoder_ffn_dim": (1, 65536),
    "decoder_ffn_dim": (1, 65536), "max_position_embeddings": (1, 65536),
}


def check_bart_config(data: Any) -> BartPreset:
    """The size a saved ``bart_config`` declares, each field within :data:`BART_BOUNDS`.

    Raises
    ------
    ConfigError
        ``data`` is not an object, lacks a field, or a value is out of range.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"Invalid bart_config {_short(data)}; expected a JSON object (a BartConfig).")
    for name, (low, high) in BART_BOUNDS.items():
        if name not in data:
            raise ConfigError(f"Invalid bart_config: it has no {name!r}.")
        _expect_in_range(f"bart_config {name}", data[name], low, high)
    for side in ("encoder", "decoder"):
        if data["d_model"] % data[f"{side}_attention_heads"]:
            raise ConfigError(f"Invalid bart_config: d_model {data['d_model']} must be divisible by "
                              f"{side}_attention_heads {data[f'{side}_attention_heads']}.")
    return BartPreset(d_model=data["d_model"], encoder_layers=data["encoder_layers"],
                      decoder_layers=data["decoder_layers"], attention_heads=data["encoder_attention_heads"],
                      ffn_dim=max(data["encoder_ffn_dim"], data["decoder_ffn_dim"]), vocab_size=data["vocab_size"])


BART_PRESETS: dict[str, BartPreset] = {
    "tiny": BartPreset(d_model=64, encoder_layers=1, decoder_layers=1, attention_heads=4, ffn_dim=128, vocab_size=512),
    # About 80M parameters like the seed's decoder.
    "small": BartPreset(d_model=640, encoder_layers=6, decoder_layers=6, attention_heads=10, ffn_dim=2560, vocab_size=8000),
    # The size of bart-base (about 140M).
    "base": BartPreset(d_model=768, encoder_layers=6, decoder_layers=6, attention_heads=12, ffn_dim=3072, vocab_size=16000),
}


# What a job's `slurm` options may hold. Names and values go to sbatch as arguments (never
# through a shell), but are still held to Slurm's own spelling so that a typo is a 422 at POST.
SLURM_OPTIONS = ("partition", "time", "gres", "cpus", "extra")
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.,:-]{1,200}")
# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_SLURM_TIME = re.compile(r"\d{1,7}(:\d{1,2}){0,2}|\d{1,5}-\d{1,2}(:\d{1,2}){0,2}")
_SLURM_EXTRA = re.compile(r"--[a-z][a-z0-9-]*(=[^\s]{1,500})?")
# Options NeuroLens sets itself: the memory it admitted the job by, the time-limit signal the
# trainer honours, where the log goes, and the batch script's own settings.
SLURM_RESERVED = ("--mem", "--mem-per-cpu", "--mem-per-gpu", "--signal", "--output", "--error", "--open-mode",
                  "--chdir", "--job-name", "--parsable", "--wrap", "--partition", "--time", "--gres",
                  "--cpus-per-task", "--requeue", "--no-requeue", "--export")


def check_slurm_options(data: Any) -> dict[str, Any]:
    """A job's ``slurm`` options, checked: only the names of :data:`SLURM_OPTIONS`, in Slurm's
    spelling; ``extra`` options must not take over one NeuroLens sets (:data:`SLURM_RESERVED`).

    Raises
    ------
    ConfigError
        Naming the option, the value and what is allowed.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"Invalid slurm {_short(data)}; expected an object with some of: {', '.join(SLURM_OPTIONS)}.")
    unknown = sorted(set(data) - set(SLURM_OPTIONS))
    if unknown:
        raise ConfigError(f"Unknown slurm option {unknown[0]!r}; expected some of: {', '.join(SLURM_OPTIONS)}.")
    out: dict[str, Any] = {}
    for name in ("partition", "gres"):
        if name in data:
            if not isinstance(data[name], str) or not _SLURM_NAME.fullmatch(data[name]):
                raise ConfigError(f"Invalid slurm.{name} {_short(data[name])}; expected a Slurm name such as "
                                  f"{'gpu' if name == 'partition' else 'gpu:1'} (letters, digits, _ . , : -).")
            out[name] = data[name]
    if "time" in data:
        time = data["time"]
        if isinstance(time, int) and not isinstance(time, bool) and 1 <= time <= MAX_COUNT:
            time = str(time)
        if not isinstance(time, str) or not _SLURM_TIME.fullmatch(time):
            raise ConfigError(f"Invalid slurm.time {_short(data['time'])}; expected minutes (30) or Slurm's "
                              f"D-HH:MM:SS forms ('2:00:00', '1-12').")
        out["time"] = time
    if "cpus" in data:
        _expect_in_range("slurm.cpus", data["cpus"], 1, 4096)
        out["cpus"] = data["cpus"]
    if "extra" in data:
        extra = data["extra"]
        if not isinstance(extra, list) or len(extra) > 32:
            raise ConfigError(f"Invalid slurm.extra {_short(extra)}; expected a list of at most 32 sbatch options.")
        for option in extra:
            if not isinstance(option, str) or not _SLURM_EXTRA.fullmatch(option):
                raise ConfigError(f"Invalid slurm.extra option {_short(option)}; expected '--name' or '--name=value' "
                                  f"(one sbatch long option, no spaces).")
            if option.split("=", 1)[0] in SLURM_RESERVED:
                raise ConfigError(f"Invalid slurm.extra option {option!r}; NeuroLens sets "
                                  f"{option.split('=', 1)[0]} itself (use the slurm options partition, time, gres, "
                                  f"cpus, or the job's memory prediction).")
        out["extra"] = list(extra)
    return out


@dataclass
class TrainConfigBase:
    """Fields shared by both stages. Unknown keys in a job config are refused."""

    preset: str = "tiny"
    """Model size by name (stage 1: encoder presets; stage 2: BART presets)."""
    steps: int = 0
    """Optimizer steps to train for in total (resumed runs continue to this count); 0 derives
    them from the dataset when the run starts: ``epochs`` passes over the training samples,
    within the stage's ``AUTO_STEPS`` bounds (see :meth:`steps_for`)."""
    epochs: float = 20.0
    """Passes over the training samples when ``steps`` is 0."""
    batch_size: int = 0
    """Effective batch size: samples per optimizer step; 0 takes the preset's (``PRESET_BATCH``)."""
    micro_batch_size: int = 0
    """Samples per forward/backward pass in each process; 0 means batch_size / devices (no
    accumulation). Gradients accumulate over batch_size / (devices * micro_batch_size) passes."""
    lr: float = 0.0
    """Peak learning rate (linear warm-up, cosine decay); 0 takes the preset's (``PRESET_LR``)."""
    warmup_steps: int = 10
    """Steps of linear learning-rate warm-up."""
    optimizer: str = "adamw"
    """'adamw' or 'adafactor'."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many optimizer steps (and at the end)."""
    eval_every: int = 50
    """Measure the validation loss every this many steps (and at the last); the final model or
    encoder is the state with the lowest one (``best_step`` in the metrics)."""
    patience: int = 0
    """Evaluations without a lower validation loss before the run stops early (a success; the
    best state is kept); 0 trains on to ``steps``."""
    log_every_s: float = 2.0
    """Seconds between progress events sent to the server."""
    seed: int = 0
    """Seed for model init, data order and masking; a resumed run restores the RNG state."""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu' or 'cuda'."""
    precision: str = "auto"
    """'auto', 'float32' or 'bfloat16': the autocast dtype of forward passes. 'auto' is bfloat16
    on a CUDA device that supports it and float32 on the CPU, where bench/throughput.py shows
    bfloat16 autocast is slower. Weights and optimizer state stay float32 either way."""
    devices: int = 1
    """Processes training in data parallel (one per GPU on CUDA; CPU processes with gloo
    otherwise). More than 1 launches the trainer through ``torchrun``; the effective batch is
    still ``batch_size``, split evenly across the processes."""
    split: dict = dataclasses.field(default_factory=dict)
    """Which data is held out. ``{}``: sentences split by text, disjoint across all subjects.
    ``{"test_subjects": ["01", ...], "text_disjoint": true}``: a cross-subject test; Stage 2 tests
    on exactly those subjects' sentences and trains on none of their recordings (``text_disjoint``,
    default true, also leaves out other subjects' sentences of the same texts); Stage 1 leaves
    their recordings out of training. Subjects are checked against the dataset at submission."""

    slurm: dict[str, Any] | None = None
    """Options of the Slurm batch job (executor 'slurm' only), each overriding the server's
    NEUROLENS_SLURM_* default: 'partition', 'time' (minutes or D-HH:MM:SS), 'gres' ('gpu:1'),
    'cpus' (per task) and 'extra' (a list of further sbatch options, each '--name=value')."""

    PRESET_NAMES: ClassVar[tuple[str, ...]] = ()
    PRESET_LR: ClassVar[dict[str, float]] = {}
    PRESET_BATCH: ClassVar[dict[str, int]] = {}
    AUTO_STEPS: ClassVar[tuple[int, int]] = (200, 5000)
    """Fewest and most steps ``steps: 0`` derives (see :meth:`steps_for`)."""

    def __post_init__(self) -> None:
        if self.slurm is not None:
            self.slurm = check_slurm_options(self.slurm)
        expect_choice("preset", self.preset, self.PRESET_NAMES)
        # The preset's learning rate and batch where the config leaves them at 0: the values
        # measured to learn at that size (docs/notes/defaults.md). The job's config then records them.
        if self.lr == 0 and not isinstance(self.lr, bool):
            self.lr = self.PRESET_LR[self.preset]
        if self.batch_size == 0 and not isinstance(self.batch_size, bool):
            self.batch_size = self.PRESET_BATCH[self.preset]
        _expect_positive("steps", self.steps, allow_zero=True)
        _expect_positive("epochs", self.epochs, integer=False)
        _expect_positive("eval_every", self.eval_every)
        _expect_positive("patience", self.patience, allow_zero=True)
        _expect_positive("batch_size", self.batch_size)
        _expect_positive("micro_batch_size", self.micro_batch_size, allow_zero=True)
        _expect_positive("devices", self.devices)
        if self.devices > MAX_DEVICES:
            raise ConfigError(f"Invalid devices {self.devices}; at most {MAX_DEVICES} processes are supported.")
        if self.batch_size % self.devices:
            raise ConfigError(
                f"Invalid devices {self.devices}; it must divide batch_size {self.batch_size} "
                f"(each process takes an equal share of every batch)."
            )
        if self.micro_batch_size == 0:
            self.micro_batch_size = self.batch_size // self.devices
        if self.per_process_batch % self.micro_batch_size:
            where = (f"batch_size {self.batch_size}" if self.devices == 1 else
                     f"the per-process batch {self.per_process_batch} (batch_size {self.batch_size} / devices {self.devices})")
            raise ConfigError(f"Invalid micro_batch_size {self.micro_batch_size}; it must divide {where}.")
        _expect_positive("lr", self.lr, integer=False)
        _expect_positive("warmup_steps", self.warmup_steps, allow_zero=True)
        expect_choice("optimizer", self.optimizer, ("adamw", "adafactor"))
        _expect_positive("checkpoint_every", self.checkpoint_every)
        _expect_positive("log_every_s", self.log_every_s, integer=False)
        if self.log_every_s < MIN_LOG_EVERY_S:
            raise ConfigError(f"Invalid log_every_s {self.log_every_s!r}; it must be at least {MIN_LOG_EVERY_S} "
                              f"(seconds between progress events).")
        _expect_positive("seed", self.seed, allow_zero=True)
        expect_choice("device", self.device, ("auto", "cpu", "cuda"))
        expect_choice("precision", self.precision, ("auto", "float32", "bfloat16"))
        self.split = check_split(self.split)

    def steps_for(self, n_train: int) -> int:
        """The steps a run on ``n_train`` training samples takes: ``steps`` if set, else ``epochs``
        passes over them, at least ``AUTO_STEPS[0]`` (a small dataset still needs that many
        updates to learn) and at most ``AUTO_STEPS[1]`` (a large one is then trained in a bounded
        time; set ``steps`` for more)."""
        if self.steps:
            return self.steps
        low, high = self.AUTO_STEPS
        return min(max(math.ceil(self.epochs * n_train / self.batch_size), low), high)

    def with_steps_for(self, n_train: int) -> "TrainConfigBase":
        """This config with ``steps`` resolved for ``n_train`` training samples (checked again:
        ``unfreeze_steps`` must fit)."""
        return dataclasses.replace(self, steps=self.steps_for(n_train))

    @property
    def per_process_batch(self) -> int:
        """Samples each of the ``devices`` processes contributes to one optimizer step."""
        return self.batch_size // self.devices

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches each process runs per optimizer step."""
        return self.per_process_batch // self.micro_batch_size

    @property
    def test_subjects(self) -> list[str]:
        """Held-out subject labels (``split.test_subjects``); empty for a split by text."""
        return list(self.split.get("test_subjects", []))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SPLIT_KEYS = ("test_subjects", "text_disjoint")
MAX_TEST_SUBJECTS = 1000
"""Most held-out subjects a split names: the list travels to the dataset check as one
command-line argument, which Linux caps at 128 KiB."""
_LABEL = re.compile(r"[A-Za-z0-9]{1,64}")


def check_split(split: Any) -> dict[str, Any]:
    """A job's ``split`` checked and normalised: labels without their ``sub-`` prefix, and
    ``text_disjoint`` present exactly when ``test_subjects`` is. Whether the subjects exist is
    the dataset's to say (the submission-time check and the trainer ask it)."""
    if not isinstance(split, dict):
        raise ConfigError(f"Invalid split {_short(split)}; expected an object such as {{\"test_subjects\": [\"01\"]}}.")
    unknown = sorted(set(split) - set(SPLIT_KEYS))
    if unknown:
        raise ConfigError(f"Unknown split key {unknown[0]!r}; expected some of: {', '.join(SPLIT_KEYS)}.")
    if "test_subjects" not in split:
        if "text_disjoint" in split:
            raise ConfigError("Invalid split: text_disjoint applies to a split with test_subjects only.")
        return {}
    subjects = split["test_subjects"]
    if (not isinstance(subjects, list) or not subjects
            or not all(isinstance(s, str) and s.removeprefix("sub-").strip() for s in subjects)):
        raise ConfigError(f"Invalid split.test_subjects {_short(subjects)}; expected a non-empty list of subject "
                          f"labels such as [\"01\", \"02\"].")
    if len(subjects) > MAX_TEST_SUBJECTS:
        raise ConfigError(f"Invalid split.test_subjects: {len(subjects)} subjects; at most {MAX_TEST_SUBJECTS}.")
    labels = [s.strip().removeprefix("sub-") for s in subjects]
    bad = next((label for label in labels if not _LABEL.fullmatch(label)), None)
    if bad is not None:
        raise ConfigError(f"Invalid split.test_subjects label {_short(bad)}; a subject label is 1 to 64 letters and "
                          f"digits (BIDS sub-<label>), such as \"01\".")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"Invalid split.test_subjects {_short(subjects)}; each subject may appear once.")
    text_disjoint = split.get("text_disjoint", True)
    if not isinstance(text_disjoint, bool):
        raise ConfigError(f"Invalid split.text_disjoint {_short(text_disjoint)}; expected true or false.")
    return {"test_subjects": labels, "text_disjoint": text_disjoint}


@dataclass
class Stage1Config(TrainConfigBase):
    """Self-supervised training of the MultiView encoder."""

    optimizer: str = "adafactor"
    """'adafactor' (factored second moments: a few MB of state for 265M parameters) or 'adamw'."""
    epochs: float = 2.0
    """Passes over the training windows when ``steps`` is 0 (windows overlap sentences' worth of
    signal; two passes, at least 200 steps, gave Stage 2 features it reads: docs/notes/defaults.md)."""
    mask_ratio: float = 0.5
    """Share of (channel, patch) tokens masked for reconstruction."""
    agreement_weight: float = 0.1
    """Weight of the cross-view agreement term in the loss."""
    visible_weight: float = 1.0
    """Weight of reconstructing the visible (unmasked) tokens, relative to the masked ones; 0
    scores masked tokens only. Keeps the final states of visible tokens tied to the signal."""
    decorrelation_weight: float = 25.0
    """Weight of the term that whitens the final token states (VICReg's variance and covariance
    terms; see :class:`trainer.models.multiview.SSLHead`); 0 turns it off. Without it the states
    group same-word windows no better than a random-init encoder's."""
    fused_optimizer: bool = True
    """Step each parameter from its gradient hook during backward, so no full set of gradients
    is ever held (see :class:`trainer.memory.FusedOptimizer`); off means a plain loop with
    global gradient-norm clipping."""
    activation_checkpointing: bool = True
    """Keep only each transformer block's input and recompute the block during backward."""
    accumulate_dtype: str = "bfloat16"
    """'bfloat16' or 'float32': dtype gradients are carried in across micro-batches when the
    optimizer is fused (bfloat16 halves that buffer at a small rounding cost)."""
    window_s: float = 0.0
    """Training window length in seconds; 0 keeps the preset's. Must be whole patches."""
    channels: list[str] = dataclasses.field(default_factory=list)
    """The encoder's electrodes, in order; empty keeps the preset's. A dataset's own cap (ZuCo's
    104 HydroCel names ``E2`` ... ``E124``) is then read by name, with no interpolation."""
    val_windows: int = 256
    """Most held-out windows the final validation loss is measured on; 0 skips it."""
    probe_words: int = 1500
    """Word-onset windows the final linear probe uses; 0 skips the probe (it runs the encoder
    and a random-init copy of it over every window)."""

    PRESET_NAMES: ClassVar[tuple[str, ...]] = tuple(EncoderConfig.PRESETS)
    PRESET_LR: ClassVar[dict[str, float]] = {name: 1e-3 for name in EncoderConfig.PRESETS}
    PRESET_BATCH: ClassVar[dict[str, int]] = {name: 8 for name in EncoderConfig.PRESETS}

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.mask_ratio, bool) or not isinstance(self.mask_ratio, (int, float)) or not 0 < self.mask_ratio < 1:
            raise ConfigError(f"Invalid mask_ratio {self.mask_ratio!r}; expected a number between 0 and 1.")
        _expect_positive("agreement_weight", self.agreement_weight, integer=False, allow_zero=True)
        _expect_positive("visible_weight", self.visible_weight, integer=False, allow_zero=True)
        _expect_positive("decorrelation_weight", self.decorrelation_weight, integer=False, allow_zero=True)
        for name in ("fused_optimizer", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Invalid {name} {getattr(self, name)!r}; expected true or false.")
        expect_choice("accumulate_dtype", self.accumulate_dtype, ("bfloat16", "float32"))
        _expect_positive("window_s", self.window_s, integer=False, allow_zero=True)
        _expect_positive("val_windows", self.val_windows, allow_zero=True)
        _expect_positive("probe_words", self.probe_words, allow_zero=True)
        self.encoder  # a window that is not whole patches fails here, before the job is queued

    @property
    def encoder(self) -> EncoderConfig:
        preset = EncoderConfig.from_name(self.preset)
        if self.channels:
            if not isinstance(self.channels, list | tuple):
                raise ConfigError(f"Invalid channels {_short(self.channels)}; expected a list of electrode names.")
            preset = dataclasses.replace(preset, channels=tuple(self.channels))
        if self.window_s:
            return dataclasses.replace(preset, window_s=float(self.window_s))
        return preset


@dataclass
class Stage2Config(TrainConfigBase):
    """BART on the frozen Stage 1 encoder (phase 1), then optionally end to end (phase 2)."""

    max_target_tokens: int = 32
    """Longest tokenized sentence kept (longer ones are truncated)."""
    pretrained_dir: str = ""
    """Local directory with a pretrained BART and tokenizer; empty means build from the preset."""
    unfreeze_steps: int = 0
    """The last this many of ``steps`` train the encoder too (phase 2, end to end); 0 keeps it
    frozen throughout."""
    num_beams: int = 1
    """Beams for free-running generation during evaluation."""
    fused_optimizer: bool = True
    """Step each parameter from its gradient hook during backward, so no full set of gradients
    is ever held (see :class:`trainer.memory.FusedOptimizer`); off means a plain loop with
    global gradient-norm clipping."""
    activation_checkpointing: bool = True
    """Phase 2: recompute each encoder block during backward instead of keeping its activations."""
    accumulate_dtype: str = "bfloat16"
    """'bfloat16' or 'float32': dtype gradients are carried in across micro-batches when the
    optimizer is fused."""
    bootstrap_samples: int = 1000
    """Replicates of the paired bootstrap interval for (EEG - noise) BLEU-1."""

    PRESET_NAMES: ClassVar[tuple[str, ...]] = tuple(BART_PRESETS)
    # A BART trained from scratch on a few hundred sentences learns at tiny's 3e-3 and writes one
    # word for every input at 5e-4 within the same steps (docs/notes/defaults.md); the larger
    # presets keep 5e-4, which is not yet measured against others.
    PRESET_LR: ClassVar[dict[str, float]] = {"tiny": 3e-3, "small": 5e-4, "base": 5e-4}
    PRESET_BATCH: ClassVar[dict[str, int]] = {name: 16 for name in BART_PRESETS}

    def __post_init__(self) -> None:
        super().__post_init__()
        _expect_positive("max_target_tokens", self.max_target_tokens)
        _expect_positive("unfreeze_steps", self.unfreeze_steps, allow_zero=True)
        _expect_positive("num_beams", self.num_beams)
        _expect_positive("bootstrap_samples", self.bootstrap_samples)
        if self.steps and self.unfreeze_steps > self.steps:
            raise ConfigError(
                f"Invalid unfreeze_steps {self.unfreeze_steps}; it cannot exceed steps {self.steps}."
            )
        if not isinstance(self.pretrained_dir, str):
            raise ConfigError(f"Invalid pretrained_dir {self.pretrained_dir!r}; expected a path string.")
        for name in ("fused_optimizer", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Invalid {name} {getattr(self, name)!r}; expected true or false.")
        expect_choice("accumulate_dtype", self.accumulate_dtype, ("bfloat16", "float32"))
        if self.devices != 1:
            raise ConfigError(f"Invalid devices {self.devices} for stage2; Stage 2 trains in one process "
                              f"(data-parallel training is Stage 1's).")

    @property
    def bart(self) -> BartPreset:
        return BART_PRESETS[self.preset]

    @property
    def frozen_steps(self) -> int:
        """Steps of phase 1 (encoder frozen, its outputs read from the cache)."""
        return self.steps - self.unfreeze_steps


def config_fields(cls: type[TrainConfigBase]) -> list[dict[str, Any]]:
    """Field names, defaults and types of a stage's config class, for forms and documentation."""
    out = []
    for f in dataclasses.fields(cls):
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append({"name": f.name, "default": default, "type": type(default).__name__})
    return out


__all__ = [
    "BART_BOUNDS", "BART_PRESETS", "CHANNELS_32", "CHANNELS_8", "ConfigError", "EncoderConfig", "MIN_LOG_EVERY_S",
    "SLURM_OPTIONS", "Stage1Config", "Stage2Config", "TrainConfigBase", "check_bart_config", "check_slurm_options",
    "config_fields", "expect_choice",
]

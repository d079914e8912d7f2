"""Server settings: command-line flags over ``NEUROLENS_*`` environment variables over defaults."""

from __future__ import annotations

import ipaddress
import os
import shlex
import socket
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEUROLENS_", extra="ignore")

    data_dir: Path = Field(Path("neurolens-data"), description="Database, job directories and artifacts live here.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means SQLite in the data directory.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    executor: str = Field("local", description="What runs the trainers: one of server.executors.EXECUTORS "
                                               "('local': processes on this machine; 'slurm': batch jobs).")
    # Named by its variable alone: `public_url` is the bound address's property, and an alias
    # without the prefix would read any PUBLIC_URL in the environment.
    advertised_url: str = Field("", validation_alias="neurolens_public_url",
                                description="NEUROLENS_PUBLIC_URL: the server's URL as trainers see it (on a "
                                            "cluster, the login node's address from a compute node); empty means "
                                            "the bound address.")
    # The slurm executor's defaults; a job's config `slurm: {...}` overrides each (trainer.config).
    slurm_partition: str = Field("", description="sbatch --partition; empty: the cluster's default.")
    slurm_time: str = Field("", description="sbatch --time (minutes, or D-HH:MM:SS); empty: the partition's.")
    slurm_gres: str = Field("", description="sbatch --gres, e.g. 'gpu:1'; empty: none.")
    slurm_cpus: int = Field(0, ge=0, description="sbatch --cpus-per-task; 0: Slurm's default (1).")
    slurm_extra: str = Field("", description="More sbatch options for every job, shell-quoted, e.g. '--account=lab'.")
    slurm_signal_s: int = Field(300, ge=1, description="Seconds before the time limit Slurm sends SIGUSR1: the "
                                                       "trainer checkpoints and the job continues in a new allocation.")
    slurm_memory_margin_bytes: int = Field(512 * 1024**2, ge=0,
                                           description="Added to a job's predicted peak for its --mem request.")
    slurm_poll_s: float = Field(2.0, gt=0, description="Seconds between `scontrol show job` reads of one job.")
    slurm_check_timeout_s: float = Field(300.0, ge=0, description="How long the start-up check job (is the data "
                                                                  "folder shared?) may take; 0 skips the check.")
    concurrency: int = Field(1, ge=1, description="Trainer subprocesses allowed to run at once.")
    heartbeat_timeout_s: float = Field(120.0, gt=0, description="A trainer silent this long is killed and its attempt fails.")
    max_attempts: int = Field(3, ge=1, description="Attempts per job before a crashing trainer fails it.")
    sample_interval_s: float = Field(1.0, gt=0, description="Seconds between psutil samples of trainer memory.")
    access_log: bool = Field(False, description="Log every HTTP request (trainer heartbeats and dashboard polls included).")
    demo: bool = Field(False, description="Queue the demo pipeline (Stage 1 then Stage 2, synthetic) on first start.")
    max_upload_bytes: int = Field(8 * 1024**3, gt=0, description="Largest artifact upload accepted.")
    upload_expiry_s: float = Field(7 * 24 * 3600.0, gt=0,
                                   description="An unfinished upload untouched this long is deleted.")
    max_request_bytes: int = Field(1024**2, gt=0, description="Largest body accepted by any endpoint but uploads.")
    max_progress_events: int = Field(2000, ge=10, description="Progress events kept per job; older ones are thinned "
                                                              "evenly past this, other events are all kept.")
    token: str = Field("", description="Bearer token every /api request but /api/health needs; required off loopback. "
                                        "Prefer token_file or the environment: a flag shows in `ps`.")
    token_file: Path | None = Field(None, description="File holding the token (first line); read at start.")
    allowed_hosts: str = Field("", description="Comma-separated host names served besides loopback names and the "
                                               "bound address (any other Host header is refused: DNS rebinding).")
    memory_budget_bytes: int = Field(0, ge=0, description="Cap on the predicted peak memory of all running jobs together; 0 means no cap.")
    memory_pause_share: float = Field(0.9, gt=0, le=1, description="A trainer past this share of its memory allowance is checkpointed and paused.")
    dataset_roots: str = Field("", description="Folders dataset paths must lie in, os.pathsep-separated (':' on "
                                               "Linux); empty allows any path. Required off loopback.")
    dataset_check_timeout_s: float = Field(60.0, gt=0, description="Time allowed to open every recording of a "
                                                                  "dataset (headers only) before a job is queued.")
    keep_checkpoints: int = Field(3, ge=0, description="Intermediate checkpoints each job keeps, newest first; older "
                                                        "ones are deleted as new ones are written, except those that "
                                                        "are artifacts. 0 keeps every one.")
    memory_margin_bytes: int = Field(256 * 1024**2, ge=0, description="Free memory kept back for the OS and the user's other work.")

    @field_validator("slurm_extra")
    @classmethod
    def _sbatch_options(cls, value: str) -> str:
        try:
            options = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split it into sbatch options ({exc})") from None
        if any(not option.startswith("-") for option in options):
            raise ValueError("expected sbatch options only, each starting with '-', e.g. '--account=lab'")
        return value

    @model_validator(mode="after")
    def _read_token_file(self) -> "Settings":
        if self.token_file is None:
            return self
        try:
            from_file = self.token_file.read_text().strip().splitlines()
        except OSError as exc:
            raise ValueError(f"Cannot read the token file {str(self.token_file)!r}: {exc.strerror}.") from exc
        if not from_file or not from_file[0].strip():
            raise ValueError(f"The token file {str(self.token_file)!r} is empty; put the token on its first line.")
        if self.token and self.token != from_file[0].strip():
            raise ValueError("Both a token and a token file were given, and they differ; give one of them.")
        self.token = from_file[0].strip()
        return self

    @property
    def allowed_host_names(self) -> frozenset[str]:
        return frozenset(name.strip().lower() for name in self.allowed_hosts.split(",") if name.strip())

    @property
    def is_loopback(self) -> bool:
        """Whether the server listens on loopback only (then it may run without a token)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check_exposure(self) -> None:
        """Refuse to serve beyond loopback without a token: anyone on the network could train."""
        if not self.is_loopback and not self.token:
            raise ValueError(
                f"Refusing to listen on {self.host!r} without a token: set NEUROLENS_TOKEN (or --token) "
                "so that every mutating request must carry 'Authorization: Bearer <token>'."
            )
        if not self.is_loopback and not self.dataset_roots:
            raise ValueError(
                f"Refusing to listen on {self.host!r} without dataset roots: set NEUROLENS_DATASET_ROOTS to the "
                "folders jobs may read datasets from, so that no request can point a job at any file on the server."
            )

    @property
    def dataset_root_paths(self) -> tuple[Path, ...]:
        """The dataset roots, resolved (a symlinked root is judged by where it leads)."""
        return tuple(Path(part).expanduser().resolve() for part in self.dataset_roots.split(os.pathsep) if part.strip())

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'neurolens.db').resolve()}"

    @property
    def trainer_url(self) -> str:
        """URL trainers report to: NEUROLENS_PUBLIC_URL where set, else :attr:`public_url`."""
        return self.advertised_url.rstrip("/") or self.public_url

    @property
    def server_name(self) -> str:
        """How this server names itself in the attempts it starts, so that servers sharing a
        database tell theirs apart: NEUROLENS_PUBLIC_URL where set, else the bound address, or on
        a wildcard bind this host's name and port (two such servers would both be 127.0.0.1)."""
        if self.advertised_url:
            return self.advertised_url.rstrip("/")
        if self.host in ("0.0.0.0", "", "::"):
            return f"http://{socket.gethostname()}:{self.port}"
        return self.public_url

    @property
    def public_url(self) -> str:
        """URL of the bound address (a wildcard bind is reached over loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"


def describe_settings_error(exc: ValidationError) -> str:
    """One clause per problem, naming the setting and the value given.

    A problem with the settings as a whole (the token file) shows its message only: its input is
    every setting, the token among them, which must not reach a terminal or a log.
    """
    return "; ".join(
        f"invalid {'.'.join(str(p) for p in err['loc'])} {err.get('input')!r}: {err['msg']}" if err["loc"]
        else err["msg"].removeprefix("Value error, ")
        for err in exc.errors())


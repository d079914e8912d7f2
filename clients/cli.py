"""The ``neurolens`` command: run a server, submit and watch jobs, fetch artifacts.

Every command but ``serve`` talks to a server over HTTP through :class:`NeuroLensClient`
(``--server`` or ``$NEUROLENS_SERVER``). Failures print one ``error: ...`` line to stderr and
exit with status 1; nothing here prints a traceback for an expected failure.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from clients.client import SERVER_ENV, TOKEN_ENV, NeuroLensClient
from clients.exceptions import NeuroLensError
from clients.format import (
    describe_disk, describe_jobs_by_status, describe_metrics, format_bytes, format_duration, format_memory,
    format_progress, progress_cell, short_status_label, status_label,
)

app = typer.Typer(
    name="neurolens",
    help="Train EEG-to-text models on a NeuroLens server.",
    no_args_is_help=True,
    add_completion=False,
    # Local variables in tracebacks could print tokens or paths; expected errors never reach
    # the traceback handler anyway (see _connect).
    pretty_exceptions_enable=False,
)

console = Console(highlight=False)


@dataclass
class _Options:
    server: str | None
    token: str | None = None


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise (``raise _fail(...)``)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def _connect(ctx: typer.Context) -> Iterator[NeuroLensClient]:
    """A client for the chosen server; NeuroLens errors become one stderr line and exit 1."""
    try:
        with NeuroLensClient(ctx.obj.server if ctx.obj else None, token=ctx.obj.token if ctx.obj else None) as client:
            yield client
    except NeuroLensError as exc:
        raise _fail(str(exc)) from None


def _print_version(value: bool) -> None:
    if value:
        from server import __version__  # server/__init__.py holds only the version: nothing heavy loads

        typer.echo(f"neurolens {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    server: Annotated[Optional[str], typer.Option(
        "--server", "-s", envvar=SERVER_ENV, show_envvar=True,
        help="Server URL, e.g. http://gpu-box:8000 (default http://127.0.0.1:8000).")] = None,
    token: Annotated[Optional[str], typer.Option(
        "--token", envvar=TOKEN_ENV, show_envvar=True, show_default=False,
        help="The server's access token, sent as 'Authorization: Bearer' (needed beyond loopback).")] = None,
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    ctx.obj = _Options(server=server, token=token)


JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table, for scripts.")]


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


# -- serve -------------------------------------------------------------------------------------

@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Interface to bind (0.0.0.0 for all).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to listen on.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Database, jobs and artifacts directory.")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Queue the synthetic demo pipeline on first start.")] = False,
    token: Annotated[Optional[str], typer.Option(
        "--token", show_default=False,
        help="Access token every API request must carry; required beyond loopback. It shows in `ps`: prefer "
             "--token-file or NEUROLENS_TOKEN.")] = None,
    token_file: Annotated[Optional[Path], typer.Option(
        "--token-file", show_default=False, help="File whose first line is the token (or NEUROLENS_TOKEN_FILE).")] = None,
) -> None:
    """Run the NeuroLens server (flags override NEUROLENS_* environment variables)."""
    # Imported here so that client commands never pay for FastAPI, SQLModel and uvicorn.
    from server.app import serve as run_server
    from server.settings import Settings, describe_settings_error

    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if demo:
        overrides["demo"] = True
    if token is not None:
        overrides["token"] = token
    if token_file is not None:
        overrides["token_file"] = token_file
    from pydantic import ValidationError

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # e.g. --port 70000, a bad NEUROLENS_* variable, an unreadable token file
        raise _fail(describe_settings_error(exc)) from None
    try:
        settings.check_exposure()
    except ValueError as exc:
        raise _fail(str(exc), code=2) from None
    run_server(settings)


# -- jobs --------------------------------------------------------------------------------------

def _parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses (numbers, booleans), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise typer.BadParameter(f"expected key=value, got {text!r}", param_hint="--set")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


@app.command()
def submit(
    ctx: typer.Context,
    stage: Annotated[str, typer.Argument(
        help="stage1 (encoder) or stage2 (BART on the encoder): the stages the server's /api/presets lists.")],
    dataset: Annotated[str, typer.Option(help="'synthetic', 'synthetic:null', 'synthetic:zuco', "
                                              "'synthetic:zuco-null' or a path on the server.")] = "synthetic",
    preset: Annotated[Optional[str], typer.Option(help="Model size, e.g. tiny, small, base.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps in total.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Other config fields as key=value (repeatable), e.g. --set lr=3e-4.")] = None,
    after: Annotated[Optional[int], typer.Option(help="Stage 2: start from this Stage 1 job's encoder.")] = None,
    encoder_artifact: Annotated[Optional[int], typer.Option(help="Stage 2: start from this encoder artifact.")] = None,
    checkpoint_artifact: Annotated[Optional[int], typer.Option(
        help="Stage 1: resume from this checkpoint artifact (e.g. transferred from another machine).")] = None,
    devices: Annotated[Optional[int], typer.Option(
        help="Stage 1: train in this many data-parallel processes (one per GPU), launched by torchrun.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the new job id.")] = False,
) -> None:
    """Queue a training job."""
    config: dict[str, Any] = dict(_parse_assignment(item) for item in set_ or ())
    if preset is not None:
        config["preset"] = preset
    if steps is not None:
        config["steps"] = steps
    if devices is not None:
        config["devices"] = devices
    with _connect(ctx) as client:
        job = client.submit_job(stage, dataset, config, after=after, encoder_artifact=encoder_artifact,
                                checkpoint_artifact=checkpoint_artifact)
    if quiet:
        typer.echo(job["id"])
        return
    console.print(f"Job {job['id']} submitted: {job['stage']} on {job['dataset']}, {status_label(job)}.")


@app.command("jobs")
def list_jobs(
    ctx: typer.Context,
    status: Annotated[Optional[str], typer.Option(help="Only jobs with this status.")] = None,
    stage: Annotated[Optional[str], typer.Option(help="Only stage1 or stage2 jobs.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first; a failed job's error follows the table."""
    with _connect(ctx) as client:
        jobs = client.list_jobs(status=status, stage=stage)
    if as_json:
        _print_json(jobs)
        return
    if not jobs:
        console.print("No jobs.")
        return
    table = Table(show_edge=False, pad_edge=False)
    for name, justify in (("ID", "right"), ("Stage", "left"), ("Status", "left"), ("Progress", "left"),
                          ("Loss", "right"), ("Peak RSS", "right"), ("Tries", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for job in jobs:
        loss = (job.get("metrics") or {}).get("loss")
        peak = (job.get("memory") or {}).get("peak_rss_bytes")
        table.add_row(str(job["id"]), job["stage"], short_status_label(job), progress_cell(job),
                      f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                      format_bytes(peak), str(job.get("attempts", 0)))
    console.print(table)
    failed = [job for job in jobs if job.get("error")]
    if failed:
        console.print()
    for job in failed:
        # One line each, cut to the terminal: `neurolens status ID` shows the whole message.
        console.print(f"job {job['id']}: {job['error']}", overflow="ellipsis", no_wrap=True, crop=True)


@app.command()
def status(
    ctx: typer.Context,
    job_id: Annotated[Optional[int], typer.Argument(help="Job id; without one, the server's summary.",
                                                    show_default=False)] = None,
    as_json: JsonOption = False,
) -> None:
    """Show one job (status, phase, progress, memory, disk, metrics, attempts, artifacts), or the server."""
    if job_id is None:
        _server_status(ctx, as_json)
        return
    with _connect(ctx) as client:
        job = client.get_job(job_id)
    if as_json:
        _print_json(job)
        return
    rows: list[tuple[str, str]] = [
        ("Job", f"{job['id']} ({job['stage']} on {job['dataset']})"),
        ("Status", status_label(job)),
        *([("Phase", job["phase"])] if job.get("phase") else []),
        ("Progress", format_progress(job.get("progress"))),
        ("Memory", format_memory(job.get("memory"))),
        ("Disk", format_bytes(job.get("disk_bytes"))),
        ("Attempts", str(job.get("attempts", 0))),
    ]
    if job.get("after") is not None:
        rows.append(("After job", str(job["after"])))
    if job.get("encoder_artifact") is not None:
        rows.append(("Encoder artifact", str(job["encoder_artifact"])))
    for key in ("created_at", "started_at", "finished_at"):
        if job.get(key):
            rows.append((key.replace("_at", "").capitalize(), str(job[key]).replace("T", " ")))
    if job.get("error"):
        rows.append(("Error", str(job["error"])))
    console.print(_grid(rows))
    labelled, scores = describe_metrics(job.get("metrics") or {})
    if labelled:
        console.print()
        console.print(_grid(labelled, title="Metrics"))
    if scores:
        console.print()
        table = Table(title="Test scores by input", title_justify="left")
        for name, justify in (("Score", "left"), ("EEG", "right"), ("Noise", "right"), ("Shuffled EEG", "right")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for label, values in scores:
            table.add_row(label, *values)
        console.print(table)
    if job.get("attempt_history"):
        console.print()
        console.print(_attempt_table(job["attempt_history"]))
    if job.get("artifacts"):
        console.print()
        console.print(_artifact_table(job["artifacts"]))


def _grid(rows: list[tuple[str, str]], title: str | None = None) -> Table:
    """Labels in bold beside their values; a long value wraps in its own column."""
    grid = Table.grid(padding=(0, 2))
    if title:
        grid.title, grid.title_justify = title, "left"
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def _server_status(ctx: typer.Context, as_json: bool) -> None:
    """The server's machine, disk, jobs and executor, labelled."""
    with _connect(ctx) as client:
        system = client.system()
        url = client.base_url
    if as_json:
        _print_json(system)
        return
    gpus = system.get("gpus") or []
    rows = [
        ("Server", f"{url} (NeuroLens {system.get('version', '?')})"),
        ("Executor", str(system.get("executor", "-"))),
        ("Memory", f"{format_bytes(system.get('memory_available_bytes'))} available of "
                   f"{format_bytes(system.get('memory_total_bytes'))}"),
        ("CPUs", str(system.get("cpu_count") or "-")),
        ("GPUs", "; ".join(f"{g['index']}: {g['name']}, {format_bytes(g.get('memory_used_bytes'))} of "
                           f"{format_bytes(g.get('memory_total_bytes'))} used" for g in gpus) or "none"),
        ("Disk", describe_disk(system.get("disk"))),
        ("Jobs", describe_jobs_by_status(system.get("jobs_by_status")
                                         or {"running": system.get("running_jobs"), "queued": system.get("queued_jobs")})),
    ]
    console.print(_grid(rows))


def _attempt_table(attempts: list[dict]) -> Table:
    table = Table(title="Attempts", title_justify="left")
    for name in ("#", "Steps", "Peak", "How it ended"):
        table.add_column(name, overflow="fold")
    for attempt in attempts:
        ended = (attempt.get("outcome") or "running").replace("_", " ")
        if attempt.get("exit_code") is not None:
            ended += f" (exit {attempt['exit_code']})"
        table.add_row(str(attempt["number"]), f"{attempt['start_step']}-{attempt.get('end_step') or '…'}",
                      format_bytes(attempt.get("peak_rss_bytes")), ended)
    return table


@app.command()
def watch(
    ctx: typer.Context,
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    interval: Annotated[float, typer.Option(help="Seconds between polls.", min=0.2)] = 1.0,
) -> None:
    """Follow a job with a live progress bar until it succeeds, fails or is cancelled.

    A paused job is still followed, since it may be resumed from elsewhere; Ctrl-C stops
    watching without touching the job.
    """
    from clients.watch import watch_job  # rich.live is only needed here

    with _connect(ctx) as client:
        try:
            job = watch_job(client, job_id, console, interval=interval)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
    console.print(f"Job {job['id']} {status_label(job)}.")
    if job["status"] != "succeeded":
        if job.get("error"):
            typer.echo(f"error: {job['error']}", err=True)
        raise typer.Exit(1)


@app.command()
def logs(
    ctx: typer.Context,
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    tail_bytes: Annotated[int, typer.Option(help="How much of the end of the log to show.", min=1)] = 65536,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing what the log gains until the job ends (Ctrl-C stops following).")] = False,
) -> None:
    """Print the end of a job's trainer log."""
    # Plain echo: a log line with [brackets] must not be read as rich markup.
    with _connect(ctx) as client:
        if not follow:
            text = client.logs(job_id, tail_bytes=tail_bytes)
            typer.echo(text, nl=not text.endswith("\n"))
            return
        try:
            for text in client.follow_logs(job_id, tail_bytes=tail_bytes):
                typer.echo(text, nl=False)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def _transition(ctx: typer.Context, job_id: int, action: str) -> None:
    with _connect(ctx) as client:
        job = getattr(client, f"{action}_job")(job_id)
    console.print(_transition_message(job, action))


def _transition_message(job: dict[str, Any], action: str) -> str:
    """What a pause, cancel, resume or retry did, in the user's words."""
    number = job["id"]
    if job["status"] == "running":  # pause or cancel of a running trainer: it stops at its next report
        then = f"then stops; `neurolens resume {number}` continues it" if action == "pause" else "then stops"
        return f"{action.capitalize()} requested: job {number} checkpoints at its next step, {then}."
    if action in ("resume", "retry"):
        budget = " with fresh retries" if action == "retry" else ""
        return (f"Job {number} is {status_label(job)} again{budget}; it continues from its newest checkpoint "
                f"(step {(job.get('progress') or {}).get('step') or 0}).")
    return f"Job {number} {status_label(job)}."


@app.command()
def cancel(ctx: typer.Context, job_id: Annotated[int, typer.Argument(help="Job id.")]) -> None:
    """Cancel a job (a running trainer checkpoints, then stops)."""
    _transition(ctx, job_id, "cancel")


@app.command()
def pause(ctx: typer.Context, job_id: Annotated[int, typer.Argument(help="Job id.")]) -> None:
    """Pause a running job; it checkpoints and stops, and keeps that checkpoint for `resume`."""
    _transition(ctx, job_id, "pause")


@app.command()
def resume(ctx: typer.Context, job_id: Annotated[int, typer.Argument(help="Job id.")]) -> None:
    """Queue a paused job again; it continues from its newest checkpoint."""
    _transition(ctx, job_id, "resume")


@app.command()
def retry(ctx: typer.Context, job_id: Annotated[int, typer.Argument(help="Job id.")]) -> None:
    """Queue a failed or cancelled job again; it continues from its newest checkpoint with fresh retries."""
    _transition(ctx, job_id, "retry")


# -- deleting ----------------------------------------------------------------------------------

delete_app = typer.Typer(help="Delete a job (with its files) or an artifact.", no_args_is_help=True)
app.add_typer(delete_app, name="delete")

YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")]


def _confirm(question: str, yes: bool) -> None:
    """Ask before deleting unless ``--yes``; without a terminal to ask on, refuse."""
    if yes:
        return
    if not sys.stdin.isatty() and not _stdin_has_answer():
        raise _fail(f"{question} Pass --yes to delete without asking (stdin is not a terminal).", code=2)
    import click

    try:
        agreed = typer.confirm(question, default=False)
    except click.exceptions.Abort:  # end of input: no answer is no
        agreed = False
    if not agreed:
        raise _fail("nothing deleted.")


def _stdin_has_answer() -> bool:
    """Whether an answer was piped in (``echo y | neurolens delete ...``), as tests and scripts do."""
    try:
        import select

        return bool(select.select([sys.stdin], [], [], 0)[0])
    except (ValueError, OSError, TypeError):  # not a real file (a test runner's stream): let confirm read it
        return True


@delete_app.command("job")
def delete_job(ctx: typer.Context, job_id: Annotated[int, typer.Argument(help="Job id.")], yes: YesOption = False,
               as_json: JsonOption = False) -> None:
    """Delete a finished or paused job: its directory, events, attempts and the artifacts no other job uses."""

    def question(client: NeuroLensClient) -> str:
        job = client.get_job(job_id)
        return (f"Delete job {job_id} ({job['stage']}, {status_label(job)}) and {format_bytes(job.get('disk_bytes'))} "
                f"of files, {len(job.get('artifacts') or [])} artifact(s) included?")

    _delete(ctx, f"Job {job_id}", question, lambda client: client.delete_job(job_id), yes, as_json)


@delete_app.command("artifact")
def delete_artifact(ctx: typer.Context, artifact_id: Annotated[int, typer.Argument(help="Artifact id.")],
                    yes: YesOption = False, as_json: JsonOption = False) -> None:
    """Delete an artifact that no queued, running or paused job uses."""

    def question(client: NeuroLensClient) -> str:
        record = client.get_artifact(artifact_id)
        owner = "imported" if record["job_id"] is None else f"of job {record['job_id']}"
        return (f"Delete artifact {artifact_id} ({record['kind']} {record['filename']}, {owner}, "
                f"{format_bytes(record['size_bytes'])})?")

    _delete(ctx, f"Artifact {artifact_id}", question, lambda client: client.delete_artifact(artifact_id), yes, as_json)


def _delete(ctx: typer.Context, what: str, question, remove, yes: bool, as_json: bool) -> None:
    """Ask ``question(client)`` unless ``yes``, then ``remove(client)`` and say what it did."""
    with _connect(ctx) as client:
        if not yes:
            _confirm(question(client), yes)
        answer = remove(client)
    if as_json:
        _print_json(answer)
        return
    console.print(_deleted_message(answer, what), markup=False)


def _deleted_message(answer: dict[str, Any], what: str) -> str:
    text = f"{what} deleted; {format_bytes(answer.get('freed_bytes'))} freed."
    kept = answer.get("kept_artifacts") or []
    if kept:
        text += (f" Kept artifact{'s' if len(kept) > 1 else ''} {', '.join(map(str, kept))}: other jobs use "
                 f"{'them' if len(kept) > 1 else 'it'} (now listed without a job).")
    elif answer.get("freed_bytes") == 0 and what.startswith("Artifact"):
        text += " Its file is still in its job's directory (a hard link); deleting the job frees it."
    return text


# -- artifacts ---------------------------------------------------------------------------------

def _artifact_table(artifacts: list[dict[str, Any]]) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    for name, justify in (("ID", "right"), ("Job", "right"), ("Kind", "left"), ("File", "left"),
                          ("Size", "right"), ("sha256", "left")):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for art in artifacts:
        table.add_row(str(art["id"]), "imported" if art["job_id"] is None else str(art["job_id"]), art["kind"], art["filename"],
                      format_bytes(art.get("size_bytes")), art["sha256"][:16])
    return table


@app.command()
def artifacts(
    ctx: typer.Context,
    job: Annotated[Optional[int], typer.Option(help="Only this job's artifacts.")] = None,
    kind: Annotated[Optional[str], typer.Option(help="encoder, checkpoint, model or report.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List artifacts (use an ID with `neurolens download`)."""
    with _connect(ctx) as client:
        found = client.list_artifacts(job_id=job, kind=kind)
    if as_json:
        _print_json(found)
        return
    if not found:
        console.print("No artifacts.")
        return
    console.print(_artifact_table(found))


def _newest_artifact(client: NeuroLensClient, job: int, kind: str) -> int:
    """The id of job ``job``'s newest ``kind`` artifact; a clear error when it has none."""
    client.get_job(job)  # a missing job is its own 404, not "no artifact"
    found = client.list_artifacts(job_id=job, kind=kind)
    if not found:
        others = sorted({a["kind"] for a in client.list_artifacts(job_id=job)})
        raise _fail(f"job {job} has no {kind} artifact (it has: {', '.join(others) or 'none yet'})")
    return found[0]["id"]


def _transfer_bar():
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


@app.command()
def download(
    ctx: typer.Context,
    artifact_id: Annotated[Optional[int], typer.Argument(
        help="Artifact id (see `neurolens artifacts`); or name it by --job and --kind.", show_default=False)] = None,
    # A str, not a Path: a trailing slash ("models/") must survive to mean "into this directory".
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", help="File or directory to write [default: the artifact's filename here].")] = None,
    job: Annotated[Optional[int], typer.Option(help="With --kind: the newest artifact of that kind of this job.")] = None,
    kind: Annotated[Optional[str], typer.Option(help="With --job: encoder, checkpoint, model or report.")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Ignore a partial <file>.part and start over.")] = False,
) -> None:
    """Download an artifact and verify its sha256; a partial <file>.part is resumed.

    `neurolens download --job 1 --kind encoder` fetches job 1's encoder whatever its id: ids count
    every artifact of every job, checkpoints included.
    """
    if (artifact_id is None) == (job is None or kind is None):
        raise _fail("name the artifact by its id, or by --job and --kind (not both)", code=2)
    started = time.monotonic()
    resumed_at: list[int] = []
    with _connect(ctx) as client:
        if artifact_id is None:
            artifact_id = _newest_artifact(client, job, kind)
        record = client.get_artifact(artifact_id)
        with _transfer_bar() as bar:
            task = bar.add_task(record["filename"], total=record["size_bytes"] or None)

            def progress(done: int, total: int) -> None:
                if not resumed_at:  # the first call reports what was already on disk
                    resumed_at.append(done)
                bar.update(task, completed=done)

            path = client.download_artifact(artifact_id, output, progress=progress, resume=not restart)
    if resumed_at and resumed_at[0]:
        console.print(f"Resumed at {format_bytes(resumed_at[0])} of {format_bytes(record['size_bytes'])}.")
    console.print(f"Saved {path} ({format_bytes(record['size_bytes'])}, sha256 {record['sha256'][:16]}... "
                  f"verified) in {format_duration(time.monotonic() - started)}.")


@app.command()
def upload(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The file to import.")],
    kind: Annotated[str, typer.Option(help="encoder, checkpoint, model or report.")] = "encoder",
    sha256: Annotated[Optional[str], typer.Option(
        help="The sha256 the file must have; the server refuses the upload if the bytes differ "
             "[default: computed here].")] = None,
    name: Annotated[Optional[str], typer.Option(help="Stored file name [default: the file's name].")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the new artifact id.")] = False,
) -> None:
    """Import an artifact file (e.g. an encoder from another machine); resumes an interrupted upload."""
    if not path.is_file():
        raise _fail(f"no such file: {path}")
    started = time.monotonic()
    with _connect(ctx) as client:
        with _transfer_bar() as bar:
            task = bar.add_task(path.name, total=path.stat().st_size or None)
            artifact = client.upload_artifact(path, kind, sha256=sha256, filename=name,
                                              progress=lambda done, total: bar.update(task, completed=done))
    if quiet:
        typer.echo(artifact["id"])
        return
    console.print(f"Artifact {artifact['id']} stored: {artifact['kind']} {artifact['filename']} "
                  f"({format_bytes(artifact['size_bytes'])}, sha256 {artifact['sha256'][:16]}... verified by the "
                  f"server) in {format_duration(time.monotonic() - started)}.")


@app.command()
def transfer(
    ctx: typer.Context,
    artifact_id: Annotated[int, typer.Argument(help="Artifact id on the source server (--server).")],
    to: Annotated[str, typer.Option("--to", help="URL of the receiving server, e.g. http://gpu-box:8000.")],
    to_token: Annotated[Optional[str], typer.Option(
        "--to-token", envvar="NEUROLENS_TO_TOKEN", show_envvar=True, show_default=False,
        help="The receiving server's access token, if it has one.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the artifact id on the target.")] = False,
) -> None:
    """Copy an artifact to another server, streamed and verified there (no local file)."""
    started = time.monotonic()
    with _connect(ctx) as source:
        try:
            with NeuroLensClient(to, token=to_token or "") as target:
                record = source.get_artifact(artifact_id)
                with _transfer_bar() as bar:
                    task = bar.add_task(record["filename"], total=record["size_bytes"] or None)
                    artifact, copied = source.transfer_artifact(
                        artifact_id, target, progress=lambda done, total: bar.update(task, completed=done))
        except NeuroLensError as exc:
            raise _fail(str(exc)) from None
    if quiet:
        typer.echo(artifact["id"])
        return
    if not copied:
        console.print(f"{target.base_url} already has this {artifact['kind']} as artifact {artifact['id']} "
                      f"(same sha256); nothing sent.")
        return
    console.print(f"Artifact {artifact_id} copied to {target.base_url} as artifact {artifact['id']} "
                  f"({format_bytes(artifact['size_bytes'])}, sha256 verified there) in "
                  f"{format_duration(time.monotonic() - started)}.")


def main() -> None:
    """Console-script entry point (``neurolens``)."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

"""Errors raised by the NeuroLens client library.

Every error the client raises derives from :class:`NeuroLensError`, so a caller (the CLI, a
notebook) can catch one class and print one line::

    NeuroLensError
     +-- ConnectionError      the server could not be reached at all
     +-- APIError             the server answered with a 4xx / 5xx status
     +-- ChecksumError        a downloaded file does not match its recorded sha256
     +-- JobWaitError         a job ended in, or stayed out of, the statuses waited for
          +-- JobTimeoutError the wait ran out of time (also a builtin ``TimeoutError``)

httpx errors are translated at the client boundary (``raise X(...) from exc``) so that callers
never need to import httpx to handle failures.
"""

from __future__ import annotations

import builtins
from typing import Any

import httpx


class NeuroLensError(Exception):
    """Base class of every error raised by :mod:`clients`."""


class ConnectionError(NeuroLensError, builtins.ConnectionError):  # noqa: A001 - httpx names it so too
    """The server at ``url`` could not be reached (refused, DNS, timeout before a reply)."""

    def __init__(self, url: str, reason: str = "") -> None:
        self.url = url
        self.reason = reason
        message = f"cannot reach server at {url}"
        if reason:
            message += f" ({reason})"
        super().__init__(message)


class APIError(NeuroLensError):
    """The server answered with an error status.

    Attributes
    ----------
    status_code : int
        The HTTP status code (422 for bad input, 404 for a missing job, 409 for a refused
        transition, ...).
    detail : str
        The server's ``detail`` message flattened to one line.
    """

    def __init__(self, status_code: int, detail: str, *, method: str = "", url: str = "") -> None:
        self.status_code = status_code
        self.detail = detail
        self.method = method
        self.url = url
        super().__init__(f"{detail} (HTTP {status_code})")

    @classmethod
    def from_response(cls, response: httpx.Response) -> "APIError":
        """Build the error from an error response, whatever shape its body has.

        Parameters
        ----------
        response : httpx.Response
            A response with a 4xx or 5xx status; its body must already be read.

        Returns
        -------
        APIError
            With ``detail`` taken from the JSON ``detail`` field when there is one, else from
            the body text, else from the reason phrase.
        """
        detail: Any = None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "detail" in body:
            detail = body["detail"]
        text = flatten_detail(detail) if detail is not None else response.text.strip()
        if not text:
            text = response.reason_phrase or "error"
        try:
            request: httpx.Request | None = response.request
        except RuntimeError:  # a Response built by hand has no request attached
            request = None
        return cls(
            response.status_code,
            text,
            method=request.method if request else "",
            url=str(request.url) if request else "",
        )


class ChecksumError(NeuroLensError):
    """A downloaded file's sha256 (or size) differs from the artifact record."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(f"checksum mismatch for {path}: expected {expected}, got {actual}")


class JobWaitError(NeuroLensError):
    """A job ended in a status other than those waited for; ``job`` is its last state."""

    def __init__(self, message: str, job: dict[str, Any]) -> None:
        self.job = job
        super().__init__(message)


class JobTimeoutError(JobWaitError, TimeoutError):
    """A job did not reach the awaited statuses in time; ``job`` is its last state."""


def flatten_detail(detail: Any) -> str:
    """Turn a FastAPI ``detail`` value into one readable line.

    Our own validation errors send a string. FastAPI's request validation sends a list of
    ``{"loc": [...], "msg": "..."}`` objects; those become ``"body.config.steps: msg; ..."``.

    Parameters
    ----------
    detail : Any
        The ``detail`` field of an error body.

    Returns
    -------
    str
        A single line with no newlines.
    """
    if isinstance(detail, str):
        text = detail
    elif isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                msg = str(item.get("msg", item))
                parts.append(f"{loc}: {msg}" if loc else msg)
            else:
                parts.append(str(item))
        text = "; ".join(parts)
    elif isinstance(detail, dict) and "msg" in detail:
        text = str(detail["msg"])
    else:
        text = str(detail)
    return " ".join(text.split())


__all__ = [
    "APIError", "ChecksumError", "ConnectionError", "JobTimeoutError", "JobWaitError",
    "NeuroLensError", "flatten_detail",
]

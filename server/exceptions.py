"""Errors the server raises on purpose, each mapped to one HTTP status in server.app.

    NeuroLensServerError               500  base class
    ├── BadRequest                     400  a malformed protocol header (tus: Upload-Length, Upload-Metadata, ...)
    ├── InvalidInput                   422  a request value is wrong; the message names it and what is allowed
    │   └── InvalidArtifactFile        422  uploaded bytes are not a valid artifact of the declared kind
    ├── NotFound                       404  a job, artifact or upload id that does not exist
    ├── Conflict                       409  the request does not fit the resource's current state
    ├── Unauthorized                   401  a trainer token is missing or belongs to another job
    ├── PayloadTooLarge                413  an upload larger than declared or than the server's limit
    ├── ChecksumMismatch               460  a tus PATCH body whose Upload-Checksum does not match (tus 1.0)
    ├── TusVersionUnsupported          412  a tus request without Tus-Resumable: 1.0.0
    ├── InsufficientStorage            507  an upload that does not fit on the server's disk
    └── ValidatorCrashed               500  the artifact checker subprocess failed or timed out

Foreign errors are translated where they are caught, e.g. a
:class:`trainer.artifact_format.ArtifactFormatError` from reading a header becomes an
:class:`InvalidArtifactFile` with the same message.
"""


class NeuroLensServerError(Exception):
    status_code = 500


class BadRequest(NeuroLensServerError):
    status_code = 400


class InvalidInput(NeuroLensServerError):
    status_code = 422


class InvalidArtifactFile(InvalidInput):
    """The uploaded bytes are not a valid artifact of the declared kind."""


class NotFound(NeuroLensServerError):
    status_code = 404


class Conflict(NeuroLensServerError):
    status_code = 409


class Unauthorized(NeuroLensServerError):
    status_code = 401


class PayloadTooLarge(NeuroLensServerError):
    status_code = 413


class ChecksumMismatch(NeuroLensServerError):
    """tus 1.0's checksum extension: the body was not appended (460 is tus's own status)."""

    status_code = 460


class TusVersionUnsupported(NeuroLensServerError):
    """A tus request without ``Tus-Resumable: 1.0.0``, the one version served."""

    status_code = 412


class InsufficientStorage(NeuroLensServerError):
    status_code = 507


class ValidatorCrashed(NeuroLensServerError):
    status_code = 500

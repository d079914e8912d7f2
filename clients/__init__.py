"""NeuroLens clients: the Python library, the ``neurolens`` CLI and the browser dashboard.

The dashboard is static files in ``clients/dashboard/`` that the server mounts at ``/``.
"""

from clients.client import DEFAULT_SERVER, NeuroLensClient, resolve_server_url
from clients.exceptions import (
    APIError, ChecksumError, ConnectionError, JobTimeoutError, JobWaitError, NeuroLensError,
)

__all__ = [
    "APIError", "ChecksumError", "ConnectionError", "DEFAULT_SERVER", "JobTimeoutError", "JobWaitError",
    "NeuroLensClient", "NeuroLensError", "resolve_server_url",
]

"""Errors the server raises on purpose, each mapped to one HTTP status in server.app.

    NeuroLensServerError
    ├── InvalidInput   422  a request value is wrong; the message names it and what is allowed
    ├── NotFound       404  a job or artifact id that does not exist
    ├── Conflict       409  the request does not fit the resource's current state
    └── Unauthorized   401  a trainer token is missing or belongs to another job
"""


class NeuroLensServerError(Exception):
    status_code = 500


class InvalidInput(NeuroLensServerError):
    status_code = 422


class NotFound(NeuroLensServerError):
    status_code = 404


class Conflict(NeuroLensServerError):
    status_code = 409


class Unauthorized(NeuroLensServerError):
    status_code = 401

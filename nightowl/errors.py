"""Domain errors. The HTTP API maps them to status codes, the CLI to exit codes; both show the message."""


class NightowlError(Exception):
    status_code = 400
    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(NightowlError):
    status_code = 422
    exit_code = 2


class NotFound(NightowlError):
    status_code = 404
    exit_code = 3


class Conflict(NightowlError):
    status_code = 409
    exit_code = 4


class Unauthorized(NightowlError):
    status_code = 401
    exit_code = 5


class Forbidden(NightowlError):
    status_code = 403
    exit_code = 5


class PayloadTooLarge(NightowlError):
    status_code = 413
    exit_code = 2


class UnsupportedMediaType(NightowlError):
    status_code = 415
    exit_code = 2

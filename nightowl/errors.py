"""Domain errors. The HTTP API maps them to status codes, the CLI to exit codes; both show the message.

`as_domain_error` names the failures of the machine under nightowl (a database that is busy or
unreachable, a full disk) as domain errors, so both answer them with a reason too.
"""

from __future__ import annotations

import errno

from sqlalchemy import exc as sa_exc


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


class Unavailable(NightowlError):
    """The database is busy or unreachable: nothing was changed; retry later."""

    status_code = 503
    exit_code = 6


class InsufficientStorage(NightowlError):
    """The disk (or the database) holding nightowl's data is full: nothing was changed."""

    status_code = 507
    exit_code = 7


# Disk full or over quota.
_NO_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_SQLITE_FULL, _SQLITE_BUSY, _SQLITE_LOCKED = 13, 5, 6
# PostgreSQL SQLSTATEs: disk_full; and those that mean "not now" (too many connections, out of
# memory, server shutting down or starting, lock or statement timeout, connection exceptions: 08...).
_PG_FULL = "53100"
_PG_UNAVAILABLE = ("08", "53", "57P", "55P03", "57014")


def as_domain_error(exc: BaseException) -> NightowlError | None:
    """The domain error that `exc` (from the database driver or the OS) stands for; None for others (bugs)."""
    if isinstance(exc, NightowlError):
        return exc
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return InsufficientStorage("no space left on the disk holding nightowl's data; nothing was stored")
    if isinstance(exc, sa_exc.TimeoutError):  # the connection pool stayed exhausted
        return Unavailable("the database is busy: no connection free; retry later")
    if not isinstance(exc, sa_exc.DBAPIError):
        return None
    orig = exc.orig
    sqlite_code = getattr(orig, "sqlite_errorcode", None)
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlite_code is not None and sqlite_code & 0xFF == _SQLITE_FULL or sqlstate == _PG_FULL:
        return InsufficientStorage("the database is full (no space left on its disk); nothing was stored")
    if sqlite_code is not None and sqlite_code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return Unavailable("the database is busy (another process holds its write lock); retry later")
    if sqlstate is not None and sqlstate.startswith(_PG_UNAVAILABLE):
        return Unavailable("the database is busy or unreachable; retry later")
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)) or exc.connection_invalidated:
        return Unavailable("the database is unreachable; retry later")
    return None

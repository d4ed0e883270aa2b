"""Errors over HTTP: one shape for every error, {"detail": "<message>"}, with its status code.

Besides the domain errors: a database that is busy or unreachable is 503 (with Retry-After), a
full disk or database is 507, and anything else unexpected is a JSON 500, never text/plain.
"""

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from nightowl.errors import NightowlError, Unauthorized, Unavailable, as_domain_error
from nightowl.schemas import ErrorOut

log = logging.getLogger(__name__)

# What the /v1 routes document they may answer besides success.
ERROR_RESPONSES = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 413, 415, 422, 503, 507)}

# Seconds a client should wait before retrying a 503.
RETRY_AFTER_S = 5


async def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The answer the app's exception handlers (EXCEPTION_HANDLERS) give for ``exc``."""
    handler = next(h for kind, h in EXCEPTION_HANDLERS if isinstance(exc, kind))
    return await handler(request, exc)


async def domain_error(_: Request, exc: NightowlError) -> JSONResponse:
    headers = None
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, Unavailable):
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=headers)


async def machine_error(request: Request, exc: Exception) -> JSONResponse:
    """Database driver and OS errors: 503/507 with the reason when they mean busy, unreachable or full."""
    mapped = as_domain_error(exc)
    if mapped is None:
        return await unexpected_error(request, exc)
    log.warning("%s %s: %s (%s: %s)", request.method, request.url.path, mapped.message, type(exc).__name__, exc)
    return await domain_error(request, mapped)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    # One shape for every error: {"detail": "<message>"} (FastAPI's default is a list).
    return JSONResponse({"detail": validation_message(exc)}, status_code=422)


def validation_message(exc: ValidationError | RequestValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())


# What create_app registers, most specific first (error_response picks the first that matches): a
# busy or unreachable database is 503, a full disk 507; any other failure a JSON 500.
EXCEPTION_HANDLERS = (
    (NightowlError, domain_error),
    (SQLAlchemyError, machine_error),
    (OSError, machine_error),
    (Exception, unexpected_error),
)

"""Errors over HTTP: one shape for every error, {"detail": "<message>"}, with its status code."""

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from nightowl.errors import NightowlError, Unauthorized
from nightowl.schemas import ErrorOut

# What the /v1 routes document they may answer besides success.
ERROR_RESPONSES = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 413, 415, 422)}


async def domain_error(_: Request, exc: NightowlError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=headers)


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    # One shape for every error: {"detail": "<message>"} (FastAPI's default is a list).
    return JSONResponse({"detail": validation_message(exc)}, status_code=422)


def validation_message(exc: ValidationError | RequestValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())

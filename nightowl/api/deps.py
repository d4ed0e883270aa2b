"""What the routes share, as `Annotated` dependencies (after the FastAPI full-stack template's
api/deps.py): the runtime the app serves, and the caller that the bearer token names."""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from nightowl.auth import Principal, is_admin_token
from nightowl.day import logger
from nightowl.errors import Unauthorized
from nightowl.runtime import Runtime

bearer = HTTPBearer(auto_error=False, description="A user's token, or the admin token.")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def get_runtime(request: Request) -> Runtime:
    # async: an attribute read needs no trip to the thread pool (sync dependencies take one).
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_caller(request: Request, rt: RuntimeDep, creds: BearerCredentials) -> Principal:
    """The admin, or the user whose token it is. Sync on purpose: the token lookup queries the store."""
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    if is_admin_token(creds.credentials, request.app.state.admin_token_hash):
        return Principal(user_id=None)
    user_id = logger.user_for_token(rt, creds.credentials)
    if user_id is None:
        raise Unauthorized("invalid token")
    return Principal(user_id=user_id)


CallerDep = Annotated[Principal, Depends(get_caller)]

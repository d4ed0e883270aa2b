"""Adapters: a user's adapter versions, and rolling back to an earlier one."""

from fastapi import APIRouter

from nightowl.api.deps import CallerDep, JSONBodyRoute, RuntimeDep, UserIdPath
from nightowl.api.errors import ERROR_RESPONSES
from nightowl.day import logger
from nightowl.schemas import AdapterList, RollbackIn

router = APIRouter(tags=["adapters"], responses=ERROR_RESPONSES, route_class=JSONBodyRoute)


@router.get("/v1/users/{user_id}/adapters", response_model=AdapterList)
def list_adapters(user_id: UserIdPath, rt: RuntimeDep, caller: CallerDep) -> AdapterList:
    """The user's adapter versions: active, candidate, rejected (with the reason), retired."""
    caller.require_user(user_id)
    return logger.list_adapters(rt, user_id)


@router.post("/v1/users/{user_id}/adapters/rollback", response_model=AdapterList)
def rollback(user_id: UserIdPath, body: RollbackIn, rt: RuntimeDep, caller: CallerDep) -> AdapterList:
    """Make an earlier adapter version active again (version null: back to the base model)."""
    caller.require_user(user_id)
    return logger.rollback_adapter(rt, user_id, body.version)

"""Users: created and deleted by the admin."""

from fastapi import APIRouter

from nightowl.api.deps import CallerDep, JSONBodyRoute, RuntimeDep, UserIdPath
from nightowl.api.errors import ERROR_RESPONSES
from nightowl.day import logger
from nightowl.schemas import UserCreate, UserCreated

router = APIRouter(tags=["users"], responses=ERROR_RESPONSES, route_class=JSONBodyRoute)


@router.post("/v1/users", response_model=UserCreated, status_code=201)
def create_user(body: UserCreate, rt: RuntimeDep, caller: CallerDep) -> UserCreated:
    caller.require_admin()
    return logger.create_user(rt, body.user_id, body.name)


@router.delete("/v1/users/{user_id}")
def delete_user(user_id: UserIdPath, rt: RuntimeDep, caller: CallerDep) -> dict[str, int]:
    """Delete a user: rows, replay vectors, adapters and images no one else posted (admin)."""
    caller.require_admin()
    return logger.delete_user(rt, user_id)

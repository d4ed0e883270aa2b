"""Health: is the store reachable, the model loaded, the rationale queue draining."""

from fastapi import APIRouter

from nightowl.api.deps import RuntimeDep
from nightowl.day import logger
from nightowl.schemas import Health

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health)
def healthz(rt: RuntimeDep) -> Health:
    return logger.health(rt)

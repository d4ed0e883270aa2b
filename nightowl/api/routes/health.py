"""Health: can this server do its work (database, disk, rationale worker and queue).

"ok" answers 200, "degraded" 503 with the same body naming each problem: a load balancer takes
a degraded server out of rotation, a person reads why.
"""

from fastapi import APIRouter, Request, Response

from nightowl.api.deps import RuntimeDep
from nightowl.day import logger
from nightowl.schemas import Health

router = APIRouter(tags=["ops"])


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "Degraded: `problems` says what is wrong."}},
)
def healthz(request: Request, response: Response, rt: RuntimeDep) -> Health:
    worker = getattr(request.app.state, "rationale_worker", None)
    thread = getattr(worker, "_thread", None)  # None: no provider configured, nothing started
    result = logger.health(rt, worker_alive=thread.is_alive() if thread is not None else None)
    if result.status != "ok":
        response.status_code = 503
    return result

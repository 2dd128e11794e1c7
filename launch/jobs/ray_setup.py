"""What every Ray process of a run sets up first, so a run's log holds its own lines and the real
warnings, not Ray Train's helper chatter.

:func:`runtime_env` is passed to ``ray.init`` by the driver (``launch.jobs.train.init_ray``), so
Ray runs :func:`setup_process` in each process of the job (Ray Train's controller, its workers,
its placement-group cleaner, Tune's trials) before anything else:

- Ray Train's ``PreemptionWatcher`` actor is off (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``):
  every start of it logged an ERROR from Ray core ("constructor arguments in the object store
  and max_restarts > 0"), and it only hands node-drain notices to a train function that reads
  them, which dldkd's does not: a drained node's workers get SIGTERM and save a checkpoint
  (trainer/infra/signals.py). Set the variable to 1 to have it back.
- Ray Train's ``PlacementGroupCleaner`` asks the state API every second whether the controller
  lives. On a busy head the answer times out and it warns "Failed to query Ray Train Controller
  actor state" each time: that warning is kept once per process. Where several Ray clusters run
  on one machine it could not tell which state API to ask and its monitor died with a traceback
  ("Found multiple active Ray instances"): ``RAY_ADDRESS`` names the process's own cluster.
- That cleaner also took a state-API answer without the controller (a busy dashboard answering
  with partial data) for a dead controller, and removed the placement group of a live run,
  killing its workers ("Destroying worker since its placement group was removed"). Here only a
  controller the state API reports DEAD counts as dead; no answer means "ask again"
  (:func:`patient_cleaner`).
- Ray Train's controller warns, with the traceback of a 5 s timeout, when its resource request
  is slow to answer (an overloaded head): kept once per process, without the traceback.
"""
from __future__ import annotations

import logging
import os

ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# Ray Train's controller asks for its workers' resources with a 5 s timeout; on an overloaded
# head it times out and warns, with the traceback of the timeout.
RESOURCE_REQUEST_LOGGER = "ray.train.v2._internal.execution.scaling_policy." \
    "autoscaling_coordinator_client"


class OncePerMessage(logging.Filter):
    """Lets each distinct message through once, without a traceback: the message says what
    happened; the traceback of a timeout inside Ray says nothing more."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        record.exc_info, record.exc_text = None, None
        return True


def set_env_defaults() -> None:
    """The variables above, where the user has not set them (the driver calls this too: Ray
    Train hands them from the driver to its controller)."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def patient_cleaner() -> None:
    """Ray 2.60's placement-group cleaner asks ``is_actor_alive(controller)``, which is falsy
    when the state API returns no actor at all: a lookup that found nothing then removes the
    live run's placement group. Give the cleaner a check that counts only a DEAD actor as dead
    and raises the state API's own error for "no answer", which the cleaner already treats as
    "continue monitoring"."""
    from ray.train.v2._internal.execution.controller import placement_group_cleaner
    from ray.util.state import get_actor
    from ray.util.state.exception import RayStateApiException

    def is_actor_alive(actor_id: str, timeout: int) -> bool:
        state = get_actor(actor_id, timeout=timeout)
        if state is None:
            raise RayStateApiException(f"the state API did not return actor {actor_id}")
        return state.state != "DEAD"

    placement_group_cleaner.is_actor_alive = is_actor_alive


def setup_process() -> None:
    """Run by Ray in each process of the job. It must not fail: Ray ends a process whose setup
    hook raises, so anything unexpected leaves Ray's own behaviour in place."""
    set_env_defaults()
    try:
        import ray
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        # The state API is served by the dashboard: name the cluster only where it has one
        # (the address is what the state API itself looks up).
        if _internal_kv_get(ray_constants.DASHBOARD_ADDRESS,
                            namespace=ray_constants.KV_NAMESPACE_DASHBOARD):
            if os.environ.get("RAY_ADDRESS", "auto") in ("", "auto", "local"):
                os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception:   # noqa: BLE001 (see the docstring)
        pass
    try:
        patient_cleaner()
    except Exception:   # noqa: BLE001 (another Ray version: its own cleaner stays)
        pass
    for name in (CLEANER_LOGGER, RESOURCE_REQUEST_LOGGER):
        chatty = logging.getLogger(name)
        if not any(isinstance(f, OncePerMessage) for f in chatty.filters):
            chatty.addFilter(OncePerMessage())


def runtime_env() -> dict[str, str]:
    return {"worker_process_setup_hook": f"{__name__}.setup_process"}

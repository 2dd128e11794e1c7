"""The setup hook's guard on Ray Train's placement-group cleaner: only a controller the state API
reports DEAD is dead; a lookup that returns nothing is "ask again", never "remove the live run's
placement group"."""
from __future__ import annotations

from types import SimpleNamespace

import pytest


def test_the_cleaner_removes_a_placement_group_only_for_a_dead_controller(monkeypatch):
    import ray.train.v2._internal.state.util as train_state
    import ray.util.state as state_api
    from ray.train.v2._internal.execution.controller import placement_group_cleaner as pgc
    from ray.util.state.exception import RayStateApiException

    from launch.jobs import ray_setup

    monkeypatch.setattr(pgc, "is_actor_alive", pgc.is_actor_alive)   # restored afterwards
    answers = {"a1": SimpleNamespace(state="ALIVE"), "d1": SimpleNamespace(state="DEAD"),
               "gone": None}
    for module in (state_api, train_state):
        monkeypatch.setattr(module, "get_actor", lambda actor_id, timeout: answers[actor_id])
    # Ray's own check takes "no answer" for a dead controller
    assert not pgc.is_actor_alive("gone", timeout=1)

    ray_setup.patient_cleaner()
    assert pgc.is_actor_alive("a1", timeout=1) is True
    assert pgc.is_actor_alive("d1", timeout=1) is False
    with pytest.raises(RayStateApiException, match="did not return actor gone"):
        pgc.is_actor_alive("gone", timeout=1)

"""One launch per run (launch/jobs/lease.py): the lease file on a local folder and on a real S3 API
(moto's server on 127.0.0.1)."""
from __future__ import annotations

import json
import time

import pytest

from launch.jobs.lease import Lease, LeaseHeld, run_lease
from trainer.infra import storage


@pytest.fixture(params=["local", "s3"])
def run_storage(tmp_path, request) -> str:
    return request.getfixturevalue("s3").url("runs") if request.param == "s3" else str(tmp_path)


def test_a_second_launch_is_refused_naming_the_holder(run_storage):
    with run_lease(run_storage, "r") as first:
        with pytest.raises(LeaseHeld, match=r"run 'r' is already .* by .* \(pid \d+, started "
                                             r".*another run.name.*expires \d+ s from now"):
            run_lease(run_storage, "r").acquire()
        assert first.renew(), "the holder renews its own lease"
        run_lease(run_storage, "other").acquire()   # another run is not affected
    run_lease(run_storage, "r").acquire()            # released at the end


def test_a_stale_lease_is_taken_over_and_its_holder_learns_it(run_storage):
    crashed = run_lease(run_storage, "r", ttl_s=0.5)
    crashed.acquire()
    time.sleep(0.7)                                  # no renewal for longer than its ttl
    taker = run_lease(run_storage, "r")
    taker.acquire()
    assert not crashed.renew(), "a taken-over lease must not be renewed by its old holder"
    crashed.release()                                # and not deleted by it either
    with pytest.raises(LeaseHeld):
        run_lease(run_storage, "r").acquire()
    assert taker.renew()


def test_the_heartbeat_keeps_a_short_lease_alive(tmp_path):
    with run_lease(str(tmp_path), "r", ttl_s=0.4):
        time.sleep(1.0)                              # 2.5 ttls, renewed every ttl/4
        with pytest.raises(LeaseHeld):
            run_lease(str(tmp_path), "r", ttl_s=0.4).acquire()
    assert not (tmp_path / "r" / "lease.json").exists()


def test_two_takers_of_one_stale_lease_one_wins(run_storage):
    location = storage.join(run_storage, "r", "lease.json")
    a, b = Lease(location, "r"), Lease(location, "r")
    stale = {"run": "r", "host": "gone", "pid": 1, "started": 0, "renewed": 0, "ttl_s": 1,
             "token": "old"}
    assert a.store.create(json.dumps(stale).encode())
    _, version = a.store.read()
    assert a.store.replace(a._body(), version)
    assert not b.store.replace(b._body(), version), "the stale version was already replaced"
    assert json.loads(a.store.read()[0])["token"] == a.holder["token"]


@pytest.mark.parametrize("forged, words", [
    ({"renewed": time.time() + 10 * 365 * 86400, "ttl_s": 120}, "in the future"),
    ({"renewed": time.time(), "ttl_s": 1e12}, "outside (0, 3600]"),
    ({"renewed": "soon", "ttl_s": 120}, "not a number"),
])
def test_a_lease_no_live_holder_could_write_is_taken_over_with_a_warning(tmp_path, forged,
                                                                         words, caplog):
    """A renewal in the future or an absurd TTL would otherwise block the run forever."""
    location = storage.join(str(tmp_path), "r", "lease.json")
    forger = Lease(location, "r")
    assert forger.store.create(json.dumps({**forger.holder, **forged}).encode())
    with caplog.at_level("WARNING", logger="dldkd"):
        run_lease(str(tmp_path), "r").acquire()
    assert any("took over" in r.getMessage() and words in r.getMessage()
               for r in caplog.records), caplog.text


def test_a_fresh_lease_within_the_clock_skew_is_still_held(tmp_path):
    location = storage.join(str(tmp_path), "r", "lease.json")
    holder = Lease(location, "r")
    assert holder.store.create(json.dumps({**holder.holder, "renewed": time.time() + 5}).encode())
    with pytest.raises(LeaseHeld):
        run_lease(str(tmp_path), "r").acquire()

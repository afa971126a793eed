"""Leases in object storage (geopix/leases.py): one holder at a time, on S3 and on a local disk."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from geopix import storage
from geopix.leases import Lease, LeaseLost


@pytest.fixture(params=["s3", "local"])
def where(request, stack, tmp_path) -> str:
    return f"s3://geopix-checkpoints/tests/leases/{uuid.uuid4().hex[:8]}" if request.param == "s3" else str(tmp_path)


def test_of_many_at_once_exactly_one_holds_it(where):
    uri = storage.join_uri(where, "step.json")
    leases = [Lease(uri) for _ in range(6)]
    start = threading.Barrier(len(leases))
    won: list[bool] = [False] * len(leases)

    def take(i: int) -> None:
        start.wait()
        won[i] = leases[i].acquire(renew=False)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert sum(won) == 1, won
    holder = leases[won.index(True)]
    other = Lease(uri)
    assert not other.acquire(renew=False)
    assert other.holder["owner"] == holder.owner and "expires in" in other.describe_holder()
    holder.release()
    assert storage.read_object(uri) is None and other.acquire(renew=False)
    other.release()


def test_an_expired_lease_is_taken_over_and_its_old_holder_learns_it(where):
    uri = storage.join_uri(where, "scene.json")
    stale = Lease(uri, ttl_s=0.5)
    assert stale.acquire(renew=False)
    # A holder elsewhere (another host: no way to see its process) that stopped renewing.
    record = json.loads(storage.read_object(uri)[0]) | {"host": "elsewhere"}
    etag = storage.put_object_if(uri, json.dumps(record).encode(), etag=stale.etag)
    stale.etag = etag
    assert not Lease(uri).acquire(renew=False)  # not expired yet
    time.sleep(0.6)
    fresh = Lease(uri, ttl_s=30)
    assert fresh.acquire(renew=False)
    assert not stale.renew() and stale.lost
    with pytest.raises(LeaseLost):
        stale.check()
    stale.release()  # never deletes a lease that is no longer its own
    assert json.loads(storage.read_object(uri)[0])["owner"] == fresh.owner
    fresh.release()


def test_a_live_holder_keeps_it_by_renewing_and_a_killed_one_frees_it_at_once(where, repo_root):
    uri = storage.join_uri(where, "nightly.json")
    alive = Lease(uri, ttl_s=3)  # renewed every second while it is held
    assert alive.acquire()
    first_expiry = json.loads(storage.read_object(uri)[0])["expires_at"]
    time.sleep(1.5)
    assert json.loads(storage.read_object(uri)[0])["expires_at"] > first_expiry
    alive.release()
    # A run on this host that holds the lease and is killed: its process is gone, the lease is free.
    hold = f"from geopix.leases import Lease; import time; print(Lease({uri!r}, ttl_s=600).acquire(), flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True, cwd=repo_root)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert not Lease(uri).acquire(renew=False)  # held by a live process
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    taker = Lease(uri)
    assert taker.acquire(renew=False)  # long before the 600 s expiry
    taker.release()

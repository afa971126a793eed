"""Leases in object storage: one run at a time per scene (nightly) or per step (full pipeline).

A lease is one small JSON object (``{"owner", "holder", "expires_at", ...}``) taken with a
conditional write, so that of two runs trying at once exactly one gets it: on S3 ``If-None-Match: *``
to create it, ``If-Match: <ETag>`` to renew it or to take over one that expired; on a local
filesystem the same under an exclusive ``flock`` (storage.put_object_if). While its holder runs,
a background thread renews it every ``ttl_s / 3``; it expires ``ttl_s`` after its last renewal. A
lease whose holder is known to be gone is free at once: the record names the holder's host, pid
and process start time, and a run on that host (where Ray job drivers run: the head node) sees
whether that process still lives, so a killed run's resubmission goes on at once instead of
waiting for the expiry. A holder whose lease was taken over after all (it was paused past the
expiry) learns so from :meth:`Lease.check` and must not publish.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Self

import psutil

from geopix import ray_job, storage

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 600.0


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run (it had expired): stop without publishing."""


@dataclass
class Lease:
    """A lease at ``uri``; :meth:`acquire` takes it (or says who holds it), :meth:`release` frees it."""

    uri: str
    ttl_s: float = DEFAULT_TTL_S
    owner: str = field(default_factory=lambda: f"{ray_job.run_id()}-{uuid.uuid4().hex[:8]}")
    etag: str | None = None
    holder: dict | None = None  # the record of whoever holds it, when acquire() failed
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _record(self) -> bytes:
        me = psutil.Process()
        return json.dumps({
            "owner": self.owner, "job": ray_job.run_id(), "host": socket.gethostname(), "pid": me.pid,
            "pid_started": me.create_time(), "ttl_s": self.ttl_s, "expires_at": time.time() + self.ttl_s,
            "renewed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }).encode()  # fmt: skip

    def acquire(self, renew: bool = True) -> bool:
        """Take the lease if it is free or expired; True on success. With ``renew``, a thread keeps
        it alive until :meth:`release`."""
        etag = storage.put_object_if(self.uri, self._record(), absent=True)
        if etag is None:
            current = storage.read_object(self.uri)
            if current is None:  # released between our two calls: try once more
                etag = storage.put_object_if(self.uri, self._record(), absent=True)
            else:
                held, held_etag = current
                try:
                    self.holder = json.loads(held)
                except ValueError:  # not a lease record of ours: treat it as expired
                    self.holder = {"expires_at": 0}
                if float(self.holder.get("expires_at", 0)) < time.time() or holder_gone(self.holder):
                    etag = storage.put_object_if(self.uri, self._record(), etag=held_etag)  # take it over
                    if etag is not None:
                        log.info("lease %s: took over from %s (expired or gone)", self.uri, self.holder.get("owner"))
        if etag is None:
            return False
        self.etag, self.holder, self.lost = etag, None, False
        if renew:
            self._stop.clear()
            self._thread = threading.Thread(target=self._renew_loop, name=f"lease {self.uri}", daemon=True)
            self._thread.start()
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            if not self.renew():
                return

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost``) when someone else holds it now."""
        etag = storage.put_object_if(self.uri, self._record(), etag=self.etag) if self.etag else None
        if etag is None:
            self.lost = True
            log.error("lease %s was taken over by another run; this run must not publish", self.uri)
            return False
        self.etag = etag
        return True

    def check(self) -> None:
        """Raise :class:`LeaseLost` when another run took the lease over."""
        if self.lost:
            raise LeaseLost(f"{self.uri}: another run took this lease over after it expired")

    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.etag is None or self.lost:
            return
        current = storage.read_object(self.uri)
        if current is not None and current[1] == self.etag:
            storage.delete_object(self.uri)
        self.etag = None

    def describe_holder(self) -> str:
        holder = self.holder or {}
        left = float(holder.get("expires_at", 0)) - time.time()
        return f"run {holder.get('job', '?')} (lease {holder.get('owner', '?')}, expires in {max(left, 0):.0f} s)"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_) -> None:
        self.release()


def holder_gone(record: dict) -> bool:
    """Whether a lease's holder is known to have ended: it ran on this host and its process (the
    same pid with the same start time) is no longer alive. Unknown (another host): False."""
    if record.get("host") != socket.gethostname() or "pid" not in record:
        return False
    try:
        process = psutil.Process(int(record["pid"]))
        return abs(process.create_time() - float(record.get("pid_started", 0))) > 1 or (
            process.status() == psutil.STATUS_ZOMBIE
        )
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, ValueError):
        return False

"""The aggregator lock: at most one aggregator per store.

The lock is one small object, ``locks/aggregator.lock``, holding a JSON record of its
holder: host, boot id, pid (+ the process start time, against pid reuse), since, last
refresh, lease and a random nonce. Acquiring it:

* it does not exist -> create it exclusively;
* its holder is on this host (same host name and boot id) -> it is held while that process
  lives; a dead (``kill -9``), zombie or reused pid means it is taken over, with a warning;
* its holder is on another host -> it is held while its lease is fresh: the holder calls
  `Lock.refresh()` (or runs `Lock.start_heartbeat()`) more often than every `lease_s`;
  after `lease_s` without a refresh it is taken over, with a warning;
* otherwise `LockHeld`, whose message names the holder.

Every change is a compare-and-swap on the lock object, so two aggregators racing for a stale
lock cannot both win, and a holder that lost its lock finds out on its next refresh
(`LockLost`):

* local roots: creation is ``open(O_CREAT | O_EXCL)``; take-over, refresh and release
  replace (temp file + ``os.replace``) or unlink the file only if it still holds the record
  read before, all under an ``flock`` on ``aggregator.lock.guard`` so the read-compare-write
  is atomic among aggregators;
* object stores (and memory://): TensorStore conditional writes on the object's generation.
  On GCS, creation is a write with ``ifGenerationMatch=0`` (the O_EXCL of buckets), take-over
  and refresh write with ``ifGenerationMatch=<generation read>``, release deletes with the
  same precondition; on S3 the same with ``If-None-Match: *`` / ``If-Match: <etag>``.
  Only the local and memory:// paths are tested here.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import tensorstore as ts

log = logging.getLogger(__name__)

LOCK_KEY = "locks/aggregator.lock"


class LockHeld(RuntimeError):
    """Another aggregator holds the lock; `holder` is its record."""

    def __init__(self, where: str, holder: dict[str, Any]):
        self.holder = holder
        since = holder.get("since")
        since_s = _iso(since) if isinstance(since, (int, float)) else "?"
        age = (
            time.time() - holder["refreshed"]
            if isinstance(holder.get("refreshed"), (int, float))
            else float("nan")
        )
        super().__init__(
            f"aggregator lock {where} is held by host {holder.get('host')!r} pid {holder.get('pid')} since {since_s} "
            f"(owner {holder.get('owner')}; last refreshed {age:.1f} s ago, lease {holder.get('lease_s')} s)"
        )


class LockLost(RuntimeError):
    """This process's lock was taken over (its lease expired) or removed."""


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- identity


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) from /proc/<pid>/stat; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[19])


def _pid_start(pid: int) -> int | None:
    if not os.path.isdir("/proc"):
        return None
    st = _proc_stat(pid)
    return st[1] if st else None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Is process `pid` running (not a zombie), and the same process if its start time is known?"""
    if os.path.isdir("/proc"):
        st = _proc_stat(pid)
        if st is None or st[0] in ("Z", "X"):
            return False
        return start is None or st[1] == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_reason(holder: dict[str, Any] | None, host: str, boot_id: str, now: float) -> str | None:
    """Why the lock record `holder` may be taken over, or None if it is held."""
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return "the lock record is unreadable"
    if holder.get("host") == host:
        if boot_id and holder.get("boot_id") and holder["boot_id"] != boot_id:
            return f"host {host} rebooted since the lock was taken"
        if not pid_alive(holder["pid"], holder.get("pid_start")):
            return f"its holder, pid {holder['pid']} on this host ({host}), is dead"
        return None
    refreshed, lease = holder.get("refreshed"), holder.get("lease_s")
    if not isinstance(refreshed, (int, float)) or not isinstance(lease, (int, float)):
        return "the lock record has no lease"
    if now > refreshed + lease:
        return (
            f"its lease expired (holder on host {holder.get('host')!r} last refreshed "
            f"{now - refreshed:.1f} s ago, lease {lease} s)"
        )
    return None


# ----------------------------------------------------------------------------- backends


class LocalBackend:
    """Compare-and-swap on a local file; the token is the file's content."""

    def __init__(self, path: str):
        self.path = path
        self.where = path

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path + ".guard", os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def create(self, data: bytes) -> bytes | None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return data

    def read(self) -> tuple[bytes, bytes] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def replace(self, token: bytes, data: bytes) -> bytes | None:
        cur = self.read()
        if cur is None or cur[1] != token:
            return None
        tmp = f"{self.path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return data

    def delete(self, token: bytes) -> bool:
        cur = self.read()
        if cur is None or cur[1] != token:
            return False
        os.unlink(self.path)
        return True


class KvBackend:
    """Compare-and-swap on a TensorStore kvstore object; the token is its storage generation."""

    def __init__(self, kvstore: ts.KvStore, key: str, where: str):
        self.kv = kvstore
        self.key = key
        self.where = where

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        yield  # the conditional writes are the atomic step

    def create(self, data: bytes) -> bytes | None:
        r = self.kv.read(self.key).result()
        if r.state == "value":
            return None
        return self._cas(r.stamp.generation, data)

    def read(self) -> tuple[bytes, bytes] | None:
        r = self.kv.read(self.key).result()
        return (r.value, r.stamp.generation) if r.state == "value" else None

    def replace(self, token: bytes, data: bytes) -> bytes | None:
        return self._cas(token, data)

    def delete(self, token: bytes) -> bool:
        return self._cas(token, None) is not None

    def _cas(self, token: bytes, data: bytes | None) -> bytes | None:
        # A failed condition is not an error: the returned generation is empty.
        gen = self.kv.write(self.key, data, if_equal=token).result().generation
        return gen if gen else None


# ----------------------------------------------------------------------------- the lock


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


class Lock:
    """A held aggregator lock. Use as a context manager, or call `release()`."""

    def __init__(self, backend: Any, record: dict[str, Any], token: bytes):
        self._backend = backend
        self.record = record
        self._token = token
        self._mutex = threading.Lock()
        self._held = True
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._held and self._error is None

    def refresh(self) -> None:
        """Renews the lease; raises LockLost if another aggregator took the lock over."""
        with self._mutex:
            if not self._held:
                raise LockLost(f"aggregator lock {self._backend.where} was released")
            now = time.time()
            record = {**self.record, "refreshed": now}
            with self._backend.guard():
                cur = self._backend.read()
                holder = _parse(cur[0]) if cur else None
                token = None
                if holder is not None and holder.get("nonce") == self.record["nonce"]:
                    token = self._backend.replace(cur[1], _dump(record))
            if token is None:
                self._held = False
                desc = (
                    f"host {holder.get('host')!r} pid {holder.get('pid')}" if holder else "nobody (removed)"
                )
                raise LockLost(f"aggregator lock {self._backend.where} was taken over; now held by {desc}")
            self.record, self._token = record, token

    def check(self) -> None:
        """Raises LockLost if the heartbeat found the lock taken over."""
        if self._error is not None:
            raise self._error
        if not self._held:
            raise LockLost(f"aggregator lock {self._backend.where} is not held")

    def start_heartbeat(self, interval_s: float | None = None) -> None:
        """Refreshes the lease every `interval_s` (default lease_s / 3) on a daemon thread."""
        interval = interval_s if interval_s is not None else self.record["lease_s"] / 3.0

        def beat():
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                except LockLost as e:
                    log.error("%s", e)
                    self._error = e
                    return

        self._thread = threading.Thread(target=beat, name="aggregator-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._mutex:
            if not self._held:
                return
            self._held = False
            with self._backend.guard():
                cur = self._backend.read()
                if cur is not None and (_parse(cur[0]) or {}).get("nonce") == self.record["nonce"]:
                    self._backend.delete(cur[1])

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def acquire(backend: Any, owner_info: dict[str, Any], *, lease_s: float, host: str | None = None) -> Lock:
    """Takes the lock or raises LockHeld (see the module docstring). `host` defaults to this
    machine's name; tests pass another name to play an aggregator on a second host."""
    if not lease_s > 0:
        raise ValueError(f"lease_s must be positive, got {lease_s}")
    host = host or socket.gethostname()
    boot_id = _boot_id()
    now = time.time()
    pid = os.getpid()
    record = {
        "owner": dict(owner_info),
        "host": host,
        "boot_id": boot_id,
        "pid": pid,
        "pid_start": _pid_start(pid),
        "since": now,
        "refreshed": now,
        "lease_s": float(lease_s),
        "nonce": uuid.uuid4().hex,
    }
    data = _dump(record)
    with backend.guard():
        token = backend.create(data)
        holder: dict[str, Any] | None = None
        if token is None:
            cur = backend.read()
            if cur is None:  # released in between
                token = backend.create(data)
            else:
                holder = _parse(cur[0])
                why = _stale_reason(holder, host, boot_id, now)
                if why is None:
                    raise LockHeld(backend.where, holder)
                log.warning(
                    "taking over aggregator lock %s: %s (previous holder: %s)", backend.where, why, holder
                )
                token = backend.replace(cur[1], data)
        if token is None:  # another aggregator won the race
            cur = backend.read()
            raise LockHeld(backend.where, (_parse(cur[0]) if cur else None) or holder or {})
    return Lock(backend, record, token)

"""The aggregator lock: at most one aggregator per store.

The lock is one small object, ``locks/aggregator.lock``, holding a JSON record of its
holder: host, boot id, pid namespace, pid (+ the process start time, against pid reuse),
since, last refresh, lease and a random nonce. Acquiring it:

* it does not exist, or holds a released record -> take it;
* its holder is provably dead -> take it over at once, with a warning. Provably dead: the
  record names this host, this boot id *and* this pid namespace (``/proc/self/ns/pid``), and
  its pid is not running (dead, zombie, or reused: another start time). The namespace is
  needed because containers on one machine share the boot id and often the host name but not
  their pids: a pid that is free in one container may be a live aggregator in the next. A
  record without a namespace (written before it was recorded) or a machine where it cannot be
  read proves nothing;
* otherwise it is held while its lease is fresh: the holder calls `Lock.refresh()` (or runs
  `Lock.start_heartbeat()`) more often than every `lease_s`; after `lease_s` without a
  refresh it is taken over, with a warning. A holder on a rebooted host or in another
  container, dead or not, is thus taken over one lease after its last refresh;
* otherwise `LockHeld`, whose message names the holder.

Every change is a compare-and-swap on the lock object, so two aggregators racing for a stale
lock cannot both win, and a holder that lost its lock finds out on its next refresh
(`LockLost`):

* local roots: creation is ``open(O_CREAT | O_EXCL)``; take-over, refresh and release
  replace (temp file + ``os.replace``) or unlink the file only if it still holds the record
  read before, all under an ``flock`` on ``aggregator.lock.guard`` so the read-compare-write
  is atomic among aggregators;
* gs:// and memory://: TensorStore conditional writes and deletes on the object's generation
  (on GCS ``ifGenerationMatch=0`` to create, ``ifGenerationMatch=<generation read>`` after;
  memory:// is tested, gs:// is not);
* s3://: conditional PUTs, ``If-None-Match: *`` to create and ``If-Match: <ETag read>`` to
  take over, refresh and release (tests/test_s3.py). With TensorStore 0.1.86:

  - for a non-AWS endpoint TensorStore by default peeks with a HEAD (``If-Match``) before the
    conditional PUT (and, per its source, sends no condition to a server it takes for Ceph).
    The lock therefore reopens the kvstore with ``use_conditional_write: true`` (one PUT that
    carries the condition, checked by the server only), and every `acquire` first checks that
    the server honours both conditions (`check_s3_conditional_writes`: a second create and a
    write on a stale ETag must both be refused). A server that ignores them makes `acquire`
    raise `LockUnsupported`: no lock rather than one that lets two aggregators in.
  - TensorStore sends no condition with an S3 DELETE (a HEAD ``If-Match``, then a plain
    DELETE), so deleting could remove a lock another aggregator took over in between. On S3,
    release therefore overwrites the record with a *released* record (``If-Match``) instead
    of deleting it; a released record is free to take.
  - ETags of single-part PUTs are content MD5s: every record carries a fresh nonce and
    timestamps, so two records never share one.
  - Tested against moto 5.2.5's ``moto_server``, which refuses both conditions with 412 — but
    checks and writes in two steps without a lock, so there only sequential compare-and-swap
    is meaningful; AWS S3 applies the condition atomically.
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


class LockUnsupported(RuntimeError):
    """The store cannot hold the lock safely (an S3 server that ignores conditional writes)."""


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- identity


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    """This process's pid namespace ("pid:[4026531836]"), or "" when it cannot be told: no
    /proc, or a /proc that numbers processes otherwise than this process's namespace does."""
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return ""
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_identity(host: str | None = None) -> dict[str, Any]:
    """What a lock record says about its holder: host name (`host` or this machine's), boot id,
    pid namespace, pid and the pid's start time ("" / None where they cannot be read)."""
    pid = os.getpid()
    return {
        "host": host or socket.gethostname(),
        "boot_id": _boot_id(),
        "pid_ns": _pid_namespace(),
        "pid": pid,
        "pid_start": _pid_start(pid),
    }


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


def _released(record: dict[str, Any] | None) -> bool:
    return isinstance(record, dict) and "released" in record


def _stale_reason(holder: dict[str, Any] | None, me: dict[str, Any], now: float) -> str | None:
    """Why the lock record `holder` may be taken over by the process `me` (`process_identity`),
    or None if it is held (see the module docstring)."""
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return "the lock record is unreadable"
    same_namespace = all(me[k] and holder.get(k) == me[k] for k in ("host", "boot_id", "pid_ns"))
    if same_namespace and not pid_alive(holder["pid"], holder.get("pid_start")):
        return (
            f"its holder, pid {holder['pid']} on this host ({me['host']}) and in this pid namespace, is dead"
        )
    refreshed, lease = holder.get("refreshed"), holder.get("lease_s")
    if not isinstance(refreshed, (int, float)) or not isinstance(lease, (int, float)):
        return "the lock record has no lease"
    if now > refreshed + lease:
        return (
            f"its lease expired (holder pid {holder['pid']} on host {holder.get('host')!r} last refreshed "
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
        spec = kvstore.spec().to_json()
        self.s3 = spec.get("driver") == "s3"
        if self.s3 and not spec.get("use_conditional_write"):
            # One PUT carrying If-None-Match / If-Match, checked by the server, not a HEAD first.
            kvstore = ts.KvStore.open({**spec, "use_conditional_write": True}).result()
        self.kv = kvstore
        self.key = key
        self.where = where

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        yield  # the conditional writes are the atomic step

    def create(self, data: bytes) -> bytes | None:
        if self.s3:  # create is the first step of every acquire
            check_s3_conditional_writes(self.kv, self.key + f".probe-{uuid.uuid4().hex}", self.where)
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
        if self.s3:  # no conditional DELETE on S3 (module docstring): leave a released record
            return self._cas(token, _dump({"released": time.time(), "nonce": uuid.uuid4().hex})) is not None
        return self._cas(token, None) is not None

    def _cas(self, token: bytes, data: bytes | None) -> bytes | None:
        # A failed condition is not an error: the returned generation is empty.
        gen = self.kv.write(self.key, data, if_equal=token).result().generation
        return gen if gen else None


def check_s3_conditional_writes(kv: ts.KvStore, probe_key: str, where: str) -> None:
    """Raises LockUnsupported unless the server behind `kv` refuses a create (If-None-Match: *)
    of an existing object and a write on a stale ETag (If-Match). Uses, then deletes, `probe_key`."""
    absent = kv.read(probe_key).result().stamp.generation
    try:
        first = kv.write(probe_key, b"probe 1", if_equal=absent).result().generation
        second_create = kv.write(probe_key, b"probe 2", if_equal=absent).result().generation
        kv.write(probe_key, b"probe 3").result()
        stale_write = kv.write(probe_key, b"probe 4", if_equal=first).result().generation
    finally:
        kv.write(probe_key, None).result()
    ignored = [h for h, gen in (("If-None-Match: *", second_create), ("If-Match", stale_write)) if gen]
    if not first or ignored:
        endpoint = kv.spec().to_json().get("endpoint", "AWS S3")
        raise LockUnsupported(
            f"aggregator lock {where}: the S3 server ({endpoint}) does not honour conditional writes "
            f"({', '.join(ignored) or 'a create with If-None-Match: * failed'}), so two aggregators "
            "could both take the lock; use a server that supports them (AWS S3 does), or a gs:// or local root"
        )


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
                    f"host {holder.get('host')!r} pid {holder.get('pid')}"
                    if holder and not _released(holder)
                    else "nobody (released or removed)"
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
    me = process_identity(host)
    now = time.time()
    record = {
        "owner": dict(owner_info),
        **me,
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
                if not _released(holder):
                    why = _stale_reason(holder, me, now)
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

"""Where things live under a store root, and small-object I/O on any backend.

A root is a local path (or ``file://`` URL), ``gs://bucket/prefix``, ``s3://bucket/prefix`` or
``memory://prefix`` (TensorStore's in-process store). Arrays go through TensorStore kvstore specs
built from the root; Orbax checkpoints (global/, silos/) get the root URL unchanged and exist on
local and gs:// roots only (`Root.orbax_path`): s3:// and memory:// roots hold run.json, the
tokenizer, updates and the lock.

S3 outside AWS (MinIO, Ceph, a test server): the endpoint comes from the environment as for the
AWS CLI and SDKs — ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (e.g.
``http://127.0.0.1:9000``), with the signing region from ``AWS_REGION``, else
``AWS_DEFAULT_REGION`` (TensorStore's default: us-east-1). Without an endpoint TensorStore finds
the bucket's AWS region itself. Credentials: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
(/ ``AWS_SESSION_TOKEN``), ``~/.aws`` or the instance metadata (TensorStore's default chain).

Layout (see DESIGN.md "Store layout")::

    run.json
    global/<round>/                  Orbax checkpoint (params, opt_state, meta)
    updates/<round>/<silo>/          zarr array per payload array + manifest.json (+ .regions/)
    updates/<round>/<silo>.COMMITTED written last; readers ignore an update without it
    silos/<silo>/                    Orbax checkpoints of the silo's private state
    locks/aggregator.lock

Small objects (JSON, markers) are written atomically: locally to a temporary name in the
same folder, fsynced, then ``os.replace``d; on object stores a single-object write is atomic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import urllib.parse
from typing import Any

import tensorstore as ts

RUN = "run.json"
TOKENIZER = "tokenizer.model"  # the federation's SentencePiece model, shared with every silo
GLOBAL = "global"
UPDATES = "updates"
SILOS = "silos"
LOCKS = "locks"
MANIFEST = "manifest.json"
MARKER_SUFFIX = ".COMMITTED"
REGIONS = ".regions"  # per-process region digests of a multi-host write

_SILO_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

# Every memory:// root in this process shares one TensorStore context, so two `Store`
# objects on the same memory:// root (a silo and the aggregator in one test) see the same data.
_MEMORY_CONTEXT = ts.Context()


def check_silo_name(silo: str) -> str:
    if not isinstance(silo, str) or not _SILO_RE.match(silo) or silo.endswith(MARKER_SUFFIX):
        raise ValueError(
            f"silo name {silo!r} is not a valid store name: use letters, digits, '_', '-', '.', "
            f"not starting with '.' or '-' and not ending with {MARKER_SUFFIX!r}"
        )
    return silo


def check_round(round: int) -> int:
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be a non-negative int, got {round!r}")
    return round


def global_meta(round: int, meta: Any) -> dict[str, Any]:
    """The meta a global/<round> checkpoint is written with: a copy naming its round (refused if it
    names another)."""
    check_round(round)
    meta = dict(meta)
    if meta.setdefault("round", round) != round:
        raise ValueError(f"global meta says round {meta['round']}, publishing round {round}")
    return meta


# Array items a global/<round> may carry besides params and opt_state: the compressed download's
# broadcast copy and the round's delta to it (fedjax_lm/download.py).
GLOBAL_EXTRA_ITEMS = ("broadcast", "download", "children_keys")


def global_extra_items(extra: Any) -> dict[str, Any]:
    """The extra array items of a global checkpoint, refused if one is not a GLOBAL_EXTRA_ITEMS name."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(GLOBAL_EXTRA_ITEMS))
    if unknown:
        raise ValueError(f"a global checkpoint carries no item {unknown}; known: {list(GLOBAL_EXTRA_ITEMS)}")
    return extra


def update_dir(round: int, silo: str) -> str:
    return f"{UPDATES}/{check_round(round)}/{check_silo_name(silo)}/"


def marker_key(round: int, silo: str) -> str:
    return f"{UPDATES}/{check_round(round)}/{check_silo_name(silo)}{MARKER_SUFFIX}"


def encode_component(name: str) -> str:
    """One keypath component as a safe path component: percent-encoded, never '', '.', '..',
    never starting with '.' (reserved for store-internal names) and never 'manifest.json'."""
    if name == "":
        raise ValueError("empty keypath component cannot be stored")
    out = urllib.parse.quote(name, safe="")
    if out.startswith(".") or out == MANIFEST:
        out = "%%%02X" % ord(out[0]) + out[1:]
    return out


def array_path(keypath: str) -> str:
    """Relative path (inside an update folder) of the zarr array for a '/'-joined keypath."""
    return "/".join(encode_component(c) for c in keypath.split("/"))


@dataclasses.dataclass(frozen=True)
class Root:
    """A parsed store root."""

    url: str  # as given (local paths made absolute)
    scheme: str  # "file" | "gs" | "s3" | "memory"
    bucket: str  # gs/s3 bucket; "" otherwise
    path: str  # local absolute path, or the key prefix inside the bucket / memory store ('' or ends with '/')

    @classmethod
    def parse(cls, root: str | os.PathLike) -> "Root":
        root = os.fspath(root)
        if "://" not in root:
            path = os.path.abspath(root)
            return cls(url=path, scheme="file", bucket="", path=path)
        scheme, rest = root.split("://", 1)
        if scheme == "file":
            path = os.path.abspath(urllib.parse.unquote(rest))
            return cls(url=path, scheme="file", bucket="", path=path)
        if scheme in ("gs", "s3"):
            bucket, _, prefix = rest.partition("/")
            if not bucket:
                raise ValueError(f"store root {root!r} has no bucket")
            prefix = prefix.strip("/")
            return cls(
                url=root.rstrip("/"), scheme=scheme, bucket=bucket, path=prefix + "/" if prefix else ""
            )
        if scheme == "memory":
            prefix = rest.strip("/")
            return cls(url=root.rstrip("/"), scheme="memory", bucket="", path=prefix + "/" if prefix else "")
        raise ValueError(
            f"store root {root!r}: unsupported scheme {scheme!r} (use a path, gs://, s3:// or memory://)"
        )

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    def local(self, key: str) -> str:
        assert self.is_local
        return os.path.join(self.path, *key.split("/"))

    def kvstore_spec(self, key: str = "") -> dict[str, Any]:
        """TensorStore kvstore spec for `key` (a '/'-separated path under the root; a folder
        key ends with '/')."""
        if self.scheme == "file":
            path = self.path.rstrip("/") + "/" + key
            return {"driver": "file", "path": path}
        spec: dict[str, Any] = {"driver": {"gs": "gcs", "s3": "s3", "memory": "memory"}[self.scheme]}
        if self.bucket:
            spec["bucket"] = self.bucket
        spec["path"] = self.path + key
        if self.scheme == "s3":
            spec.update(s3_endpoint())
        return spec

    def orbax_path(self, key: str) -> str:
        """`key`'s location as Orbax expects it: an absolute local path, or the gs:// URL."""
        if self.scheme == "memory":
            raise ValueError(
                f"store root {self.url!r}: Orbax checkpoints (global/, silos/) need a local path "
                "or gs:// root; memory:// holds run.json, updates and locks only"
            )
        if self.scheme == "s3":
            # orbax-checkpoint 0.12.8 turns "s3://b/p" into "s3:/b/p" (os.path.normpath; only
            # "gs:/" is repaired) and writes the arrays to that *local relative* folder, or
            # refuses it ("Checkpoint path should be absolute") with OCDBT; without s3fs its
            # epath layer already fails ("Install s3fs to access S3").
            raise NotImplementedError(
                f"store root {self.url!r}: Orbax checkpoints (global/, silos/) cannot be written to "
                "s3:// (orbax-checkpoint 0.12.8 supports local paths and gs:// only); an s3:// root "
                "holds run.json, the tokenizer, updates and the lock"
            )
        if self.is_local:
            return self.local(key)
        return f"{self.url}/{key}"

    def context(self) -> ts.Context:
        return _MEMORY_CONTEXT if self.scheme == "memory" else ts.Context()


def s3_endpoint() -> dict[str, str]:
    """TensorStore s3 kvstore options for a non-AWS endpoint, from the environment variables the
    AWS CLI and SDKs read (see the module docstring); {} on AWS itself."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        # On AWS, TensorStore asks the bucket for its region: a region taken from the
        # environment (often a CLI default) could name the wrong one.
        return {}
    out = {"endpoint": endpoint.rstrip("/")}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        out["aws_region"] = region
    return out


class Objects:
    """Small-object I/O (JSON files, markers) under a root, on every backend."""

    def __init__(self, root: Root, context: ts.Context):
        self.root = root
        self._kv = ts.KvStore.open(root.kvstore_spec(""), context=context).result()

    @property
    def kvstore(self) -> ts.KvStore:
        return self._kv

    def put(self, key: str, data: bytes) -> None:
        """Atomic write: readers see the old object or the whole new one."""
        if self.root.is_local:
            _write_atomic_local(self.root.local(key), data)
        else:
            self._kv.write(key, data).result()

    def get(self, key: str) -> bytes | None:
        r = self._kv.read(key).result()
        return r.value if r.state == "value" else None

    def exists(self, key: str) -> bool:
        if self.root.is_local:
            return os.path.isfile(self.root.local(key))
        return self.get(key) is not None

    def put_json(self, key: str, obj: Any) -> None:
        self.put(key, json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode())

    def get_json(self, key: str) -> Any:
        data = self.get(key)
        return None if data is None else json.loads(data)

    def children(self, prefix: str) -> list[str]:
        """Names directly under folder `prefix` ('a/b/'): files and sub-folders."""
        if self.root.is_local:
            try:
                return sorted(os.listdir(self.root.local(prefix.rstrip("/"))))
            except FileNotFoundError:
                return []
        # Object stores list recursively; keep the first path component after the prefix.
        keys = self._kv.list(
            ts.KvStore.KeyRange(prefix, _prefix_end(prefix)), strip_prefix_length=len(prefix)
        )
        return sorted({k.decode().split("/", 1)[0] for k in keys.result()})

    def delete_prefix(self, prefix: str) -> None:
        """Deletes every object under folder `prefix` (ends with '/')."""
        assert prefix.endswith("/")
        self._kv.delete_range(ts.KvStore.KeyRange(prefix, _prefix_end(prefix))).result()


def _prefix_end(prefix: str) -> str:
    """Exclusive upper bound of the key range starting with `prefix` ('/' + 1 == '0')."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _write_atomic_local(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

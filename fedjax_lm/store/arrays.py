"""Payload arrays on storage: naming, zarr layout, write regions, checksums, bounded reads.

Naming: a payload (see `compression`) is a tree of params whose leaves are dicts of arrays
(``{"x"}`` or ``{"q", "scale"}``). Each array is named by its '/'-joined keypath, e.g.
``blocks/0/mlp/wi/q``; the param it encodes is the keypath without the last component.

Regions and checksums: an array is written as *regions* — the shards of a `jax.Array` (one
writer per distinct shard index: the replica with ``replica_id == 0``), or the whole array
for a NumPy array. Each region's checksum is the sha256 of its raw bytes (C order, little
endian). The array's ``sha256`` is the sha256 of the whole array's raw bytes when it is one
region (the common single-host case); for several regions — a sharded multi-host write, where
no process ever holds the whole array — it is the sha256 of the text
``"<origin>:<shape>:<region sha256>\\n"`` over regions sorted by origin. A reader verifies
every region it reads, so either form catches a corrupted or truncated chunk.

Zarr layout: zarr v3, zstd-compressed chunks. The chunk grid is the shard grid (so regions
written by different processes never share a chunk), with the leading axis further split
into chunks of about `chunk_bytes` where that keeps the alignment; TensorStore reads and
decodes the chunks of one array in parallel.
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

PAYLOAD_FIELDS = ("x", "q", "scale")
DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_READ_BUDGET = 64 << 20  # bytes of read results in flight when validating / aggregating
CODECS = ("zstd", "none")

Region = dict[str, Any]  # {"origin": [int], "shape": [int], "sha256": str}


# ----------------------------------------------------------------------------- naming


def _key_name(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def keypath_str(path: Sequence[Any]) -> str:
    return "/".join(_key_name(k) for k in path)


def payload_entries(payload: Any) -> list[tuple[str, Any]]:
    """[(keypath, array)] of a payload tree, in tree order. Checks the leaf-dict layout."""
    flat = jax.tree_util.tree_flatten_with_path(payload)[0]
    if not flat:
        raise ValueError("payload has no arrays")
    out = []
    for path, leaf in flat:
        key = keypath_str(path)
        if not path or _key_name(path[-1]) not in PAYLOAD_FIELDS:
            raise ValueError(
                f"payload array {key!r} is not a field of a payload leaf dict {PAYLOAD_FIELDS}; "
                "pass the payload from compression.compress"
            )
        out.append((key, leaf))
    return out


def payload_method(entries: Sequence[tuple[str, Any]]) -> str:
    """'none' | 'bf16' | 'int8' (as in `compression`), 'ring32' | 'ring64' (secure aggregation),
    'mixed' if leaves differ."""
    methods = set()
    for key, arr in entries:
        field = key.rsplit("/", 1)[-1]
        if field == "q":
            methods.add("int8")
        elif field == "x":
            name = np.dtype(arr.dtype).name
            if name in ("uint32", "uint64"):  # secure aggregation's masked ring words
                methods.add(f"ring{np.dtype(arr.dtype).itemsize * 8}")
            else:
                methods.add("bf16" if name == "bfloat16" else "none")
    return methods.pop() if len(methods) == 1 else "mixed"


def param_keypath(array_keypath: str) -> tuple[str, str]:
    """'a/b/q' -> ('a/b', 'q')."""
    param, _, field = array_keypath.rpartition("/")
    return param, field


# ----------------------------------------------------------------------------- regions


def _norm_index(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[int]:
    return [s.indices(n)[0] for s, n in zip(index, shape)]


def write_regions(arr: Any) -> tuple[tuple[int, ...], list[tuple[list[int], Any]]]:
    """(grid unit shape, [(origin, host data)]) this process must write for `arr`.

    A `jax.Array` contributes its addressable shards with replica_id 0 (exactly one process
    owns each distinct shard index); any other array is written whole by process 0 only.
    Data is pulled to host one shard at a time, never gathered.
    """
    if isinstance(arr, jax.Array):
        shape = tuple(arr.shape)
        unit = tuple(arr.sharding.shard_shape(shape))
        regions = [(_norm_index(s.index, shape), s.data) for s in arr.addressable_shards if s.replica_id == 0]
        return unit, regions
    shape = tuple(np.shape(arr))
    return shape, ([([0] * len(shape), arr)] if jax.process_index() == 0 else [])


def region_slices(origin: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(origin, shape))


def check_grid(regions: Sequence[Region], shape: Sequence[int]) -> str | None:
    """None if `regions` tile `shape` exactly as a grid (each cell once), else the problem."""
    ndim = len(shape)
    if not regions:
        return "no regions"
    cells = set()
    for r in regions:
        if not isinstance(r, dict):
            return f"malformed region {r!r}"
        o, s = r.get("origin"), r.get("shape")
        if not (isinstance(o, list) and isinstance(s, list) and len(o) == ndim and len(s) == ndim):
            return f"region {r} has the wrong rank for shape {list(shape)}"
        if any(not isinstance(v, int) or v < 0 for v in o + s) or any(
            a + b > n for a, b, n in zip(o, s, shape)
        ):
            return f"region {o}+{s} lies outside shape {list(shape)}"
        cells.add(tuple(zip(o, s)))
    if len(cells) != len(regions):
        return "duplicate regions"
    for d in range(ndim):
        intervals = sorted({c[d] for c in cells})
        pos = 0
        for start, size in intervals:
            if start != pos:
                return f"regions do not partition axis {d} (gap or overlap at {pos})"
            pos += size
        if pos != shape[d] and not (shape[d] == 0 and pos == 0):
            return f"regions cover {pos} of {shape[d]} along axis {d}"
    if len(cells) != math.prod(len({c[d] for c in cells}) for d in range(ndim)):
        return "regions do not form a grid"
    return None


# ----------------------------------------------------------------------------- checksums


def raw_bytes(x: np.ndarray) -> np.ndarray:
    """The C-order little-endian bytes of `x`, as a flat uint8 view when possible."""
    x = np.asarray(x)
    if x.dtype.byteorder == ">":
        x = x.astype(x.dtype.newbyteorder("<"))
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def sha256_hex(x: np.ndarray) -> str:
    return hashlib.sha256(raw_bytes(x)).hexdigest()  # hashlib releases the GIL on large buffers


def array_digest(regions: Sequence[Region]) -> str:
    if len(regions) == 1:
        return regions[0]["sha256"]
    lines = "".join(
        f"{r['origin']}:{r['shape']}:{r['sha256']}\n" for r in sorted(regions, key=lambda r: r["origin"])
    )
    return hashlib.sha256(lines.encode()).hexdigest()


# ----------------------------------------------------------------------------- zarr


def chunk_shape(shape: Sequence[int], unit: Sequence[int], itemsize: int, chunk_bytes: int) -> list[int]:
    """Chunk grid: the shard grid `unit`, leading axis split to ~`chunk_bytes` when aligned."""
    chunk = [max(1, min(u, n) if n else 1) for u, n in zip(unit, shape)]
    if not chunk:
        return chunk
    row_bytes = max(1, math.prod(chunk[1:]) * itemsize)
    max_rows = max(1, chunk_bytes // row_bytes)
    rows = chunk[0]
    if rows <= max_rows:
        return chunk
    if rows >= shape[0]:  # one region along axis 0: any split is aligned; balance the chunks
        chunk[0] = -(-rows // -(-rows // max_rows))
        return chunk
    # Several regions along axis 0: the chunk must divide the region's rows.
    best = max(d for d in _divisors(rows) if d <= max_rows)
    if best * 8 >= max_rows:  # not absurdly small chunks; otherwise keep one chunk per region
        chunk[0] = best
    return chunk


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return small + [n // d for d in small]


def zarr_spec(
    kvstore: dict[str, Any], shape: Sequence[int], dtype: Any, chunks: Sequence[int], codec: str
) -> dict:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; valid: {CODECS}")
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if codec == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": 1, "checksum": False}})
    if not shape:  # 0-d: zarr v3 allows an empty chunk shape; no endianness for 1-byte types either way
        chunks = []
    return {
        "driver": "zarr3",
        "kvstore": kvstore,
        "metadata": {
            "shape": list(shape),
            "data_type": np.dtype(dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            "chunk_key_encoding": {"name": "default"},
            "fill_value": 0,
            "codecs": codecs,
        },
    }


# ----------------------------------------------------------------------------- bounded reads


class Waiter:
    """Waits on several TensorStore futures; `result()` is the list of their results."""

    def __init__(self, futures: Sequence[Any]):
        self.futures = list(futures)

    def result(self) -> list[Any]:
        return [f.result() for f in self.futures]


class BoundedReader:
    """Issues reads in order while the bytes in flight (issued, not yet released by the
    consumer) stay within `budget_bytes`, and yields the results in order.

    Each item is `(nbytes, start)`; `start()` issues the read and returns an object with
    `.result()`. At least one item is always in flight, so an item larger than the budget is
    still read (alone). The consumer releases an item by asking for the next one. Errors from
    `start()` or `.result()` are yielded (not raised) as the item's result.
    `peak_bytes` records the most bytes in flight or held at once; `read_bytes` the total.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self.peak_bytes = 0
        self.read_bytes = 0
        self.items = 0

    def run(self, items: Iterable[tuple[int, Callable[[], Any]]]) -> Iterator[tuple[int, Any]]:
        pending: collections.deque = collections.deque()
        inflight = 0  # issued and not yet released, including the item the consumer holds
        held = 0  # bytes of the item last yielded (alive until the consumer asks for the next)
        source = iter(items)
        nxt = next(source, None)
        while nxt is not None or pending:
            while nxt is not None and (not pending or inflight + nxt[0] <= self.budget_bytes):
                nbytes, start = nxt
                try:
                    handle = start()
                except Exception as e:  # noqa: BLE001 - reported to the consumer
                    handle = e
                pending.append((nbytes, handle))
                inflight += nbytes
                self.peak_bytes = max(self.peak_bytes, inflight)
                nxt = next(source, None)
            nbytes, handle = pending.popleft()
            if isinstance(handle, Exception):
                result = handle
            else:
                try:
                    result = handle.result()
                except Exception as e:  # noqa: BLE001
                    result = e
            inflight -= held  # the consumer drops the previous item when it receives this one
            held = nbytes
            self.read_bytes += nbytes
            self.items += 1
            yield nbytes, result
            del result, handle

"""Validation of a committed update before it is aggregated, with precise rejections.

`validate_update` reads every array of the update once (region by region, reads in flight up
to a byte budget) and checks, in this order, stopping at the first failure:

1. the silo is one the round expects; the round is open;
2. the update is committed; the marker (at most 4 KiB) and manifest.json (at most 4 MiB) exist,
   the manifest matches the marker's sha256; in a signed federation the marker carries the
   silo's valid Ed25519 signature of that sha256 (checked before the manifest is parsed); the
   manifest parses, names this round and silo, was trained from the global params the round
   published (`base_sha256`), and carries typed, bounded fields (`tokens`, `loss`, ...);
3. the manifest lists exactly the template's arrays, each with the template's shape and dtype,
   and at most `MAX_REGIONS` regions that tile it; the stored zarr metadata has that shape and
   dtype, a regular chunk grid equal to the manifest's chunks with chunks of at most
   `MAX_CHUNK_BYTES` and not too many of them, and only the codecs the store writes
   (`bytes` little-endian, then optionally `zstd`): no sharding, transposes or other codecs,
   so decoding one chunk costs what its size says (no decompression bombs);
4. every region's data — read and decoded by TensorStore; a chunk that cannot be decoded is a
   rejection, not a crash — has the manifest's sha256 (truncated or corrupted chunks);
5. every value is finite and decodes to a finite f32 (int8: |scale| <= f32 max / 128, so
   q·scale cannot overflow); with `like_params`, int8 block padding is zero;
6. optionally, the global L2 norm of the decoded delta is at most `max_norm`.

Any failure raises `UpdateRejected(silo, round, reason)`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import math
import os
import time
from collections.abc import Container, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from fedjax_lm import identity
from fedjax_lm.store import arrays as arrays_lib
from fedjax_lm.store import layout
from fedjax_lm.store import updates as updates_lib
from fedjax_lm.store.updates import open_array

_F32_MAX = float(np.finfo(np.float32).max)
MAX_MANIFEST_BYTES = updates_lib.MAX_MANIFEST_BYTES
# Optional manifest fields a silo reports: each a finite number in its range, or absent / null.
_NUMBER_FIELDS = {
    "loss": (0.0, 1e6),
    "finished_at": (0.0, 1e12),
    "train_seconds": (0.0, 1e9),
    "flops": (0.0, 1e30),
    "secagg_saturated": (0, 1e15),  # entries the silo's ring encoding saturated (self-reported)
    "clipped": (0, 1),  # secure aggregation with DP: the silo clipped its own update (self-reported)
    "download_from": (0, 1e9),  # compressed download: the round of the copy it started from (ledger only)
    "energy_kwh": (0.0, 1e9),  # the silo's metered training energy this round (self-reported)
    "co2_kg": (0.0, 1e12),  # its CO2-eq (self-reported)
}
_SLAB = 1 << 20  # elements per slab for the finite / norm reductions
MAX_REGIONS = 1 << 16  # regions of one array (a multi-host write has one per distinct shard)
MAX_CHUNK_BYTES = 64 << 20  # decoded bytes of one zarr chunk (the store writes ~8 MiB)
MIN_MEAN_CHUNK_BYTES = 64 << 10  # an array of many chunks must not be cut finer than this on average
_MAX_CHUNKS_ANY_SIZE = 1024


class UpdateRejected(Exception):
    """An update that must not be aggregated. `silo`, `round` and `reason` say why."""

    def __init__(self, silo: str, round: int, reason: str):
        self.silo = silo
        self.round = round
        self.reason = reason
        super().__init__(f"update from silo {silo!r} for round {round} rejected: {reason}")


def template_arrays(template_payload: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{array keypath: (shape, dtype name)} of an (abstract) payload."""
    return {
        key: (tuple(x.shape), np.dtype(x.dtype).name)
        for key, x in arrays_lib.payload_entries(template_payload)
    }


def param_sizes(like_params: Any) -> dict[str, int]:
    flat = jax.tree_util.tree_flatten_with_path(like_params)[0]
    return {arrays_lib.keypath_str(p): math.prod(x.shape) for p, x in flat}


def load_manifest(
    objects: layout.Objects,
    round: int,
    silo: str,
    *,
    allow: identity.AllowList | None = None,
    base_sha256: str | None = None,
) -> dict[str, Any]:
    """The committed manifest, checked against its marker (and signature, and base); raises UpdateRejected."""

    def reject(reason: str):
        raise UpdateRejected(silo, round, reason)

    record = updates_lib.read_marker(objects, round, silo)
    if record is None:
        reject("not committed (no COMMITTED marker)")
    if isinstance(record, str):
        reject(record)
    if allow is not None:  # before the manifest is even read: an unsigned update costs 4 KiB
        problem = updates_lib.check_signature(record, silo, allow)
        if problem:
            reject(problem)
    data = objects.get(layout.update_dir(round, silo) + layout.MANIFEST)
    if data is None:
        reject("manifest.json missing")
    if len(data) > MAX_MANIFEST_BYTES:
        reject(f"manifest.json is {len(data):,} bytes, more than the cap of {MAX_MANIFEST_BYTES:,}")
    if hashlib.sha256(data).hexdigest() != record["manifest_sha256"]:
        reject("manifest.json does not match the sha256 recorded in the COMMITTED marker")
    try:
        manifest = json.loads(data)
    except ValueError as e:
        reject(f"manifest.json does not parse: {e}")
    if not isinstance(manifest, dict):
        reject("manifest.json is not a JSON object")
    if manifest.get("round") != round or manifest.get("silo") != silo:
        reject(f"manifest names round {manifest.get('round')!r}, silo {manifest.get('silo')!r}")
    if base_sha256 is not None and manifest.get("base_global_sha256") != base_sha256:
        reject(
            f"trained from other global params (base sha256 {str(manifest.get('base_global_sha256'))[:12]}, "
            f"global/{round} is {base_sha256[:12]}): a stale or replayed update"
        )
    tokens = manifest.get("tokens")
    if (
        isinstance(tokens, bool)
        or not isinstance(tokens, (int, float))
        or not math.isfinite(tokens)
        or tokens < 0
    ):
        reject(f"manifest tokens {tokens!r} is not a finite non-negative number")
    for key, (lo, hi) in _NUMBER_FIELDS.items():
        value = manifest.get(key)
        if value is None:
            manifest.pop(key, None)  # absent and null mean "not reported"
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            reject(f"manifest {key} {str(value)[:40]!r} is not a number in [{lo:g}, {hi:g}] (or null)")
    if not isinstance(manifest.get("arrays"), list):
        reject("manifest has no 'arrays' list")
    return manifest


def check_arrays(
    manifest: dict[str, Any], template: dict[str, tuple[tuple[int, ...], str]], silo: str, round: int
) -> dict[str, dict[str, Any]]:
    """Manifest array entries by keypath, checked against the template."""
    entries: dict[str, dict[str, Any]] = {}
    for a in manifest["arrays"]:
        if not isinstance(a, dict) or not isinstance(a.get("keypath"), str):
            raise UpdateRejected(silo, round, f"malformed manifest array entry {a!r}")
        entries[a["keypath"]] = a
    missing = sorted(set(template) - set(entries))
    extra = sorted(set(entries) - set(template))
    if missing or extra:
        raise UpdateRejected(
            silo, round, f"arrays missing {missing}, unexpected {extra} (wrong method or model?)"
        )
    for key, (shape, dtype) in template.items():
        a = entries[key]
        if a.get("shape") != list(shape):
            raise UpdateRejected(
                silo, round, f"array {key!r} has shape {a.get('shape')}, expected {list(shape)}"
            )
        if a.get("dtype") != dtype:
            raise UpdateRejected(silo, round, f"array {key!r} has dtype {a.get('dtype')}, expected {dtype}")
        if a.get("path") != layout.array_path(key):
            raise UpdateRejected(silo, round, f"array {key!r} is stored at unexpected path {a.get('path')!r}")
        regions = a.get("regions")
        if not isinstance(regions, list):
            problem = "no region list"
        elif len(regions) > MAX_REGIONS:
            problem = f"{len(regions):,} regions, more than the cap of {MAX_REGIONS:,}"
        else:
            problem = arrays_lib.check_grid(regions, shape)
        if problem is None and any(not isinstance(r.get("sha256"), str) for r in regions):
            problem = "region without sha256"
        if problem is None and arrays_lib.array_digest(regions) != a.get("sha256"):
            problem = "array sha256 does not match its regions"
        if problem:
            raise UpdateRejected(silo, round, f"array {key!r}: {problem}")
    return entries


def check_opened(store: Any, entry: dict[str, Any]) -> str | None:
    """Why the opened zarr array does not match its manifest entry or the store's format, or None."""
    shape = list(store.domain.shape)
    dtype = store.dtype.numpy_dtype.name
    if shape != entry["shape"] or dtype != entry["dtype"]:
        return f"stored as {dtype}{shape}, manifest says {entry['dtype']}{entry['shape']}"
    if list(store.domain.origin) != [0] * len(shape):
        return f"stored with origin {list(store.domain.origin)}"
    return check_zarr_metadata(store.spec().to_json().get("metadata", {}), entry)


def check_zarr_metadata(meta: dict[str, Any], entry: dict[str, Any]) -> str | None:
    """The zarr metadata a silo wrote, against the format the store writes (see `arrays.zarr_spec`)."""
    grid = meta.get("chunk_grid") or {}
    chunks = (grid.get("configuration") or {}).get("chunk_shape")
    if grid.get("name") != "regular" or not isinstance(chunks, list):
        return f"zarr chunk grid {str(grid)[:80]} is not the regular grid the store writes"
    shape = entry["shape"]
    if (
        chunks != entry.get("chunks")
        or len(chunks) != len(shape)
        or any(not isinstance(c, int) or c < 1 for c in chunks)
    ):
        return f"zarr chunk shape {chunks} is not the manifest's {entry.get('chunks')}"
    itemsize = np.dtype(entry["dtype"]).itemsize
    chunk_bytes = math.prod(chunks) * itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        return f"zarr chunks of {chunk_bytes:,} bytes exceed the cap of {MAX_CHUNK_BYTES:,}"
    n_chunks = math.prod(-(-n // c) for n, c in zip(shape, chunks))
    total = math.prod(shape) * itemsize
    if n_chunks > max(_MAX_CHUNKS_ANY_SIZE, total // MIN_MEAN_CHUNK_BYTES):
        return f"zarr array cut into {n_chunks:,} chunks of {chunk_bytes:,} bytes (too many, too small)"
    codecs = meta.get("codecs")
    names = (
        [c.get("name") for c in codecs]
        if isinstance(codecs, list) and all(isinstance(c, dict) for c in codecs)
        else None
    )
    if names not in (["bytes"], ["bytes", "zstd"]):
        return f"zarr codecs {names or str(codecs)[:80]} are not the store's (bytes, then optionally zstd)"
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    if endian != "little" and itemsize > 1:
        return f"zarr bytes codec is {endian}-endian; the store writes little-endian"
    return None


class _LeafStats:
    """Per-param accumulators for the finite / norm checks."""

    def __init__(self):
        self.sumsq = 0.0
        self.row_sumsq: np.ndarray | None = None  # int8: Σ_j q_ij² per block
        self.scale: np.ndarray | None = None


def _float_stats(x: np.ndarray) -> tuple[float, int]:
    """(Σ x², count of non-finite) of a float array, one pass in the common all-finite case."""
    flat = x.reshape(-1)
    total, bad = 0.0, 0
    for i in range(0, flat.size, _SLAB):
        c = flat[i : i + _SLAB].astype(np.float32, copy=False)
        s = float(np.dot(c, c))
        if not math.isfinite(s):  # NaN/Inf present, or x² overflowed f32: decide exactly
            n = int(c.size - np.count_nonzero(np.isfinite(c)))
            bad += n
            if n == 0:
                c64 = c.astype(np.float64)
                s = float(np.dot(c64, c64))
        total += s
    return total, bad


def validate_update(
    objects: layout.Objects,
    context: ts.Context,
    round: int,
    silo: str,
    template_payload: Any,
    *,
    expected_silos: Iterable[str],
    closed_rounds: Container[int] | None = None,
    current_round: int | None = None,
    max_norm: float | None = None,
    like_params: Any = None,
    read_budget_bytes: int = arrays_lib.DEFAULT_READ_BUDGET,
    allow: identity.AllowList | None = None,
    base_sha256: str | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()

    def reject(reason: str):
        raise UpdateRejected(silo, round, reason)

    if closed_rounds is None and current_round is None:
        raise TypeError("validate_update needs closed_rounds or current_round")
    if silo not in set(expected_silos):
        reject("unknown silo (not expected in this round)")
    if closed_rounds is not None and round in closed_rounds:
        reject("round is closed")
    if current_round is not None and round != current_round:
        reject(
            f"round is {'closed' if round < current_round else 'not open yet'} (current round {current_round})"
        )

    manifest = load_manifest(objects, round, silo, allow=allow, base_sha256=base_sha256)
    template = template_arrays(template_payload)
    entries = check_arrays(manifest, template, silo, round)
    sizes = param_sizes(like_params) if like_params is not None else None

    opened = {key: open_array(objects, context, round, silo, e) for key, e in entries.items()}
    items, meta = [], []
    for key in template:
        e = entries[key]
        itemsize = np.dtype(e["dtype"]).itemsize
        for r in e["regions"]:
            sl = arrays_lib.region_slices(r["origin"], r["shape"])

            def start(key=key, sl=sl):
                return opened[key].result()[sl].read()

            items.append((math.prod(r["shape"]) * itemsize, start))
            meta.append((key, r))

    checked_open: set[str] = set()
    leaves: dict[str, _LeafStats] = {}
    reader = arrays_lib.BoundedReader(read_budget_bytes)
    with _Hasher(silo, round, read_budget_bytes) as hasher:

        def reject_data(reason: str):
            hasher.drain(0)  # a checksum mismatch is the more precise reason for bad data
            reject(reason)

        for (key, region), (_, data) in zip(meta, reader.run(items)):
            where = f"array {key!r} region {region['origin']}+{region['shape']}"
            if key not in checked_open:
                try:
                    problem = check_opened(opened[key].result(), entries[key])
                except Exception as e:  # noqa: BLE001 - any open failure is the update's fault
                    problem = f"cannot be opened: {short_error(e)}"
                if problem:
                    reject(f"array {key!r} {problem}")
                checked_open.add(key)
            if isinstance(data, Exception):
                reject_data(
                    f"{where} cannot be read or decoded (corrupted or truncated chunk?): {short_error(data)}"
                )
            hasher.submit(where, region["sha256"], data)
            param, field = arrays_lib.param_keypath(key)
            st = leaves.setdefault(param, _LeafStats())
            if field == "q":
                _int8_rows(st, data, region, entries[key]["shape"])
                if sizes is not None:
                    _check_padding(data, region, entries[key]["shape"], sizes.get(param), where, reject_data)
            elif field == "scale":
                if st.scale is None:
                    st.scale = np.empty(entries[key]["shape"], np.float32)
                st.scale[arrays_lib.region_slices(region["origin"], region["shape"])] = data
            elif np.issubdtype(np.asarray(data).dtype, np.integer):
                pass  # masked ring words (secure aggregation): uniform by design, no norm to check
            else:
                sumsq, bad = _float_stats(np.asarray(data))
                if bad:
                    reject_data(f"{where} has {bad} non-finite values (NaN/Inf)")
                st.sumsq += sumsq
            del data
        hasher.drain(0)

    norm_sq = 0.0
    for param, st in leaves.items():
        if st.scale is not None:
            scale = st.scale.astype(np.float64)
            if not np.all(np.isfinite(scale)):
                reject(
                    f"array {param + '/scale'!r} has {int(np.sum(~np.isfinite(scale)))} non-finite values (NaN/Inf)"
                )
            if np.any(np.abs(scale) > _F32_MAX / 128):  # |q| <= 128: q * scale then stays finite
                reject(
                    f"array {param + '/scale'!r} has scales above float32 max / 128: q * scale may decode to Inf"
                )
            st.sumsq += float(np.dot(scale * scale, st.row_sumsq))
        norm_sq += st.sumsq
    norm = math.sqrt(norm_sq)
    if max_norm is not None and not norm <= max_norm:
        reject(f"global norm {norm:.6g} of the decoded update exceeds the bound {max_norm:.6g}")
    manifest["validation"] = {
        "norm": norm,
        "bytes_read": reader.read_bytes,
        "peak_read_bytes": reader.peak_bytes,
        "seconds": time.perf_counter() - t0,
    }
    return manifest


class _Hasher:
    """sha256 of read regions on a thread pool (hashlib releases the GIL), overlapping the
    reads and the finite / norm checks; data awaiting its hash is bounded by `budget_bytes`."""

    def __init__(self, silo: str, round: int, budget_bytes: int):
        self.silo, self.round, self.budget = silo, round, budget_bytes
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1)))
        self.pending: collections.deque = collections.deque()
        self.pending_bytes = 0

    def submit(self, where: str, expected: str, data: np.ndarray) -> None:
        self.pending.append((where, expected, self.pool.submit(arrays_lib.sha256_hex, data), data.nbytes))
        self.pending_bytes += data.nbytes
        self.drain(self.budget)

    def drain(self, limit: int) -> None:
        while self.pending and self.pending_bytes > limit:
            where, expected, digest, nbytes = self.pending.popleft()
            self.pending_bytes -= nbytes
            if digest.result() != expected:
                reason = f"{where}: sha256 of the stored data does not match the manifest"
                raise UpdateRejected(self.silo, self.round, reason)

    def __enter__(self) -> "_Hasher":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@jax.jit
def _row_sumsq(q: jax.Array) -> jax.Array:
    # Exact in f32 for blocks up to 1024 values (Σ <= 1024 * 128² < 2^24); one fused pass.
    qf = q.astype(jnp.float32)
    return jnp.sum(qf * qf, axis=1)


def _int8_rows(st: _LeafStats, q: np.ndarray, region: dict[str, Any], shape: list[int]) -> None:
    """Adds Σ_j q_ij² per block (row) of a q region."""
    if st.row_sumsq is None:
        st.row_sumsq = np.zeros(shape[0], np.float64)
    r0 = region["origin"][0]
    st.row_sumsq[r0 : r0 + q.shape[0]] += np.asarray(_row_sumsq(q))


def _check_padding(q, region, shape, size, where, reject) -> None:
    """int8 blocks pad the flattened leaf with zeros after `size` elements; they must stay 0."""
    if size is None:
        return
    n_blocks, block = shape
    pad = n_blocks * block - size
    if pad <= 0:
        return
    (r0, c0), (nr, nc) = region["origin"], region["shape"]
    if r0 + nr < n_blocks:  # the padding lives in the last block
        return
    lo = max(block - pad, c0)
    if lo < c0 + nc and np.any(q[n_blocks - 1 - r0, lo - c0 :]):
        reject(f"{where}: int8 block padding is not zero")


def short_error(e: BaseException, limit: int = 300) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= limit else s[:limit] + "..."

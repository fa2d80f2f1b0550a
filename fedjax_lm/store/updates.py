"""Writing a silo's update (payload arrays + manifest + COMMITTED marker) and finding committed ones.

Write protocol for `updates/<round>/<silo>/` (every process of a multi-host silo calls it):

1. If `<silo>.COMMITTED` exists, return: a silo never uploads the same round twice.
2. Process 0 deletes whatever an earlier, crashed attempt left in the folder. Barrier.
3. Every process opens-or-creates each zarr array (same metadata everywhere) and writes the
   regions it owns (`arrays.write_regions`: its addressable replica-0 shards; NumPy leaves
   by process 0 only), all writes in flight at once up to a byte budget, hashing each region
   on a thread pool while TensorStore writes it. Each process then records its region
   checksums in `.regions/<process>.json`. Barrier.
4. Process 0 merges the region files into manifest.json, then writes the marker last (its
   content is the manifest's sha256, so a manifest swapped after the commit is detected, and,
   in a signed federation, the silo's Ed25519 signature of that sha256: `identity`).
   Barrier.

In a signed federation step 1 returns only if the existing marker carries this silo's own valid
signature: an update someone else committed under its name is deleted and replaced.

A crash anywhere before the marker leaves an uncommitted folder that readers ignore and that
the next attempt deletes and rewrites.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from fedjax_lm import compression
from fedjax_lm import identity
from fedjax_lm.store import arrays as arrays_lib
from fedjax_lm.store import layout

log = logging.getLogger(__name__)

FORMAT = "fedjax_lm.update/1"
# Manifest fields the store computes; a caller may pass them only with the same value.
STORE_FIELDS = ("format", "round", "silo", "method", "bytes", "arrays", "codec", "processes", "written_at")
DEFAULT_WRITE_BUDGET = 512 << 20


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy / jax scalars and arrays
        return o.tolist()
    raise TypeError(f"manifest value {o!r} of type {type(o).__name__} is not JSON serialisable")


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    # NaN/Inf allowed (a diverged silo's loss is information); Python's json reads them back.
    return json.dumps(manifest, indent=1, sort_keys=True, default=_json_default).encode()


def write_update(
    objects: layout.Objects,
    context: ts.Context,
    round: int,
    silo: str,
    payload: Any,
    manifest: Mapping[str, Any],
    *,
    codec: str = "zstd",
    chunk_bytes: int = arrays_lib.DEFAULT_CHUNK_BYTES,
    write_budget_bytes: int = DEFAULT_WRITE_BUDGET,
    signer: identity.Signer | None = None,
) -> dict[str, Any]:
    root = objects.root
    prefix = layout.update_dir(round, silo)
    marker = layout.marker_key(round, silo)
    if signer is not None and signer.name != silo:
        raise ValueError(f"update {round}/{silo}: signer {signer.name!r} cannot commit for silo {silo!r}")
    if objects.exists(marker):
        foreign = foreign_commit(objects, round, silo, signer)
        if foreign is None:
            log.info("update %s/%s is already committed; not rewriting it", round, silo)
            return read_manifest(objects, round, silo)
        log.warning("update %s/%s in the store is not this silo's (%s): replacing it", round, silo, foreign)
        if jax.process_index() == 0:
            # Readers stop counting it before its folder goes (a delete is a write of nothing).
            objects.kvstore.write(marker, None).result()
    entries = arrays_lib.payload_entries(payload)
    extra = dict(manifest)
    if "tokens" not in extra:
        raise ValueError(f"update {round}/{silo}: the manifest needs 'tokens' (the aggregation weight)")
    extra.setdefault("loss", None)
    extra.setdefault("flops", None)
    computed = {
        "format": FORMAT,
        "round": round,
        "silo": silo,
        "method": arrays_lib.payload_method(entries),
        "bytes": int(compression.payload_nbytes(payload)),
        "codec": codec,
        "processes": jax.process_count(),
    }
    for k in STORE_FIELDS:
        if k in extra and k in computed and extra[k] != computed[k]:
            raise ValueError(
                f"update {round}/{silo}: manifest field {k!r}={extra[k]!r} but the payload gives {computed[k]!r}"
            )
        if k in extra and k not in computed:
            raise ValueError(f"update {round}/{silo}: manifest field {k!r} is written by the store")

    pid = jax.process_index()
    if pid == 0:
        objects.delete_prefix(prefix)  # a crashed attempt's partial folder
    _barrier(f"fedjax_lm.store.write_update:{round}:{silo}:cleared")

    # Open-or-create every array (identical metadata on every process), all at once.
    plans = []
    for key, arr in entries:
        shape = tuple(np.shape(arr))
        dtype = np.dtype(arr.dtype)
        unit, regions = arrays_lib.write_regions(arr)
        chunks = arrays_lib.chunk_shape(shape, unit, dtype.itemsize, chunk_bytes)
        path = layout.array_path(key)
        spec = arrays_lib.zarr_spec(root.kvstore_spec(prefix + path + "/"), shape, dtype, chunks, codec)
        plans.append(
            (key, path, shape, dtype, chunks, regions, ts.open(spec, create=True, open=True, context=context))
        )

    # Writes and hashes of all regions in flight at once, up to a byte budget of host copies.
    my_regions: dict[str, list[arrays_lib.Region]] = {}
    hashes = []
    inflight: list[tuple[int, Any, Any]] = []
    inflight_bytes = 0
    workers = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for key, _, shape, _, _, regions, opened in plans:
            store = opened.result()
            for origin, data in regions:
                host = np.asarray(data)  # one shard on the host at a time, never a gather
                write = store[arrays_lib.region_slices(origin, host.shape)].write(host)
                digest = pool.submit(arrays_lib.sha256_hex, host)
                hashes.append((key, origin, list(host.shape), digest))
                inflight.append((host.nbytes, write, digest))
                inflight_bytes += host.nbytes
                del host
                while inflight_bytes > write_budget_bytes and len(inflight) > 1:
                    nbytes, w, h = inflight.pop(0)
                    w.result()
                    h.result()
                    inflight_bytes -= nbytes
        for _, w, _ in inflight:
            w.result()
        for key, origin, shape, digest in hashes:
            my_regions.setdefault(key, []).append(
                {"origin": origin, "shape": shape, "sha256": digest.result()}
            )
    objects.put_json(f"{prefix}{layout.REGIONS}/{pid}.json", my_regions)
    _barrier(f"fedjax_lm.store.write_update:{round}:{silo}:written")

    if pid == 0:
        merged: dict[str, list[arrays_lib.Region]] = {}
        for p in range(jax.process_count()):
            part = objects.get_json(f"{prefix}{layout.REGIONS}/{p}.json")
            if part is None:
                raise RuntimeError(f"update {round}/{silo}: process {p} left no region checksums")
            for key, regs in part.items():
                merged.setdefault(key, []).extend(regs)
        out_arrays = []
        for key, path, shape, dtype, chunks, _, _ in plans:
            regs = sorted(merged.get(key, []), key=lambda r: r["origin"])
            problem = arrays_lib.check_grid(regs, shape)
            if problem:
                raise RuntimeError(f"update {round}/{silo}: array {key!r} was not fully written: {problem}")
            out_arrays.append(
                {
                    "keypath": key,
                    "path": path,
                    "shape": list(shape),
                    "dtype": dtype.name,
                    "chunks": list(chunks),
                    "sha256": arrays_lib.array_digest(regs),
                    "regions": regs,
                }
            )
        full = {**extra, **computed, "arrays": out_arrays, "written_at": time.time()}
        data = manifest_bytes(full)
        objects.put(prefix + layout.MANIFEST, data)
        digest = hashlib.sha256(data).hexdigest()
        record = {"manifest_sha256": digest}
        if signer is not None:
            record.update(signer=signer.name, signature=signer.sign(identity.UPDATE_DOMAIN, digest.encode()))
        objects.put(marker, json.dumps(record).encode())
    _barrier(f"fedjax_lm.store.write_update:{round}:{silo}:committed")
    return json.loads(data) if pid == 0 else read_manifest(objects, round, silo)


MAX_MARKER_BYTES = 4096


def read_marker(objects: layout.Objects, round: int, silo: str) -> dict[str, Any] | str | None:
    """The COMMITTED marker record; None if absent; a string saying why it is unusable."""
    raw = objects.get(layout.marker_key(round, silo))
    if raw is None:
        return None
    if len(raw) > MAX_MARKER_BYTES:
        return f"COMMITTED marker is {len(raw):,} bytes, more than the cap of {MAX_MARKER_BYTES:,}"
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("manifest_sha256"), str):
        return "COMMITTED marker is not the JSON the store writes"
    return record


def check_signature(record: dict[str, Any], silo: str, allow: identity.AllowList) -> str | None:
    """None if the marker carries `silo`'s valid signature of its manifest sha256, else why not."""
    problem = allow.verify(
        silo, identity.UPDATE_DOMAIN, record["manifest_sha256"].encode(), record.get("signature")
    )
    return None if problem is None else f"update signature: {problem}"


MAX_MANIFEST_BYTES = 4 << 20  # a manifest lists one entry per array: megabytes at most for a 7B model


def commit_problem(
    objects: layout.Objects, round: int, silo: str, allow: identity.AllowList | None
) -> str | None:
    """Why the committed update under `silo`'s name is not that silo's commit for `round` (None:
    it is, as far as `allow` can tell; without an allow-list only replays are recognised)."""
    record = read_marker(objects, round, silo)
    if not isinstance(record, dict):
        return record or "not committed (no COMMITTED marker)"
    if allow is not None:
        problem = check_signature(record, silo, allow)
        if problem:
            return problem
    data = objects.get(layout.update_dir(round, silo) + layout.MANIFEST)
    if data is None or hashlib.sha256(data).hexdigest() != record["manifest_sha256"]:
        return "manifest.json missing or not the one the COMMITTED marker records"
    if len(data) > MAX_MANIFEST_BYTES:
        return None  # the silo's own (signed) oversized manifest: counts, and validation rejects it
    try:
        manifest = json.loads(data)
    except ValueError:
        return None
    if isinstance(manifest, dict) and (manifest.get("round") != round or manifest.get("silo") != silo):
        return f"manifest names round {manifest.get('round')!r}, silo {manifest.get('silo')!r} (a replay)"
    return None


def foreign_commit(
    objects: layout.Objects, round: int, silo: str, signer: identity.Signer | None
) -> str | None:
    """Why the committed update of `silo` is not one `signer` made for `round` (None: it is, or
    unsigned mode): an update someone else wrote under its name, or a replay of its own old one."""
    if signer is None:
        return None
    return commit_problem(objects, round, silo, identity.AllowList({silo: signer.public}))


def read_manifest(objects: layout.Objects, round: int, silo: str) -> dict[str, Any]:
    """The manifest of a committed update (FileNotFoundError if it is not committed)."""
    if not objects.exists(layout.marker_key(round, silo)):
        raise FileNotFoundError(
            f"update for round {round} from silo {silo!r} is not committed in {objects.root.url}"
        )
    data = objects.get(layout.update_dir(round, silo) + layout.MANIFEST)
    if data is None:
        raise FileNotFoundError(f"update for round {round} from silo {silo!r} has a marker but no manifest")
    return json.loads(data)


def open_array(objects: layout.Objects, context: ts.Context, round: int, silo: str, entry: dict[str, Any]):
    """Future of the opened (read-only) zarr array of a manifest array entry."""
    kv = objects.root.kvstore_spec(layout.update_dir(round, silo) + entry["path"] + "/")
    return ts.open({"driver": "zarr3", "kvstore": kv}, open=True, read=True, context=context)


def read_update(
    objects: layout.Objects, context: ts.Context, round: int, silo: str, template_payload: Any
) -> Any:
    """A committed payload as NumPy arrays in the structure of `template_payload` (unchecked:
    for tests, debugging and relaying; the aggregator uses validate + stream_weighted_mean)."""
    manifest = read_manifest(objects, round, silo)
    by_key = {a["keypath"]: a for a in manifest["arrays"]}
    flat, treedef = jax.tree_util.tree_flatten_with_path(template_payload)
    keys = [arrays_lib.keypath_str(p) for p, _ in flat]
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise KeyError(f"update {round}/{silo} has no arrays {missing}")
    opened = [open_array(objects, context, round, silo, by_key[k]) for k in keys]
    reads = [o.result().read() for o in opened]
    return jax.tree_util.tree_unflatten(treedef, [r.result() for r in reads])


def committed_silos(
    objects: layout.Objects, round: int, candidates: Sequence[str] | None = None
) -> list[str]:
    """Silos whose update for `round` is committed. With `candidates` (e.g. the round's
    sample), only their markers are checked (cheap on object stores, which list recursively)."""
    if candidates is not None:
        return sorted(s for s in candidates if objects.exists(layout.marker_key(round, s)))
    names = objects.children(f"{layout.UPDATES}/{layout.check_round(round)}/")
    return sorted(n[: -len(layout.MARKER_SUFFIX)] for n in names if n.endswith(layout.MARKER_SUFFIX))

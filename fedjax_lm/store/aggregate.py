"""Streaming token-weighted mean of committed updates, leaf by leaf, at storage speed.

`stream_weighted_mean` walks the params leaf by leaf and, for each leaf, the silos in the
order of `weights`. Reads are issued ahead — all silos' copies of a leaf, then the next
leaves' — while the bytes in flight stay within `read_budget_bytes`, and consumed in order:
each read array is decoded and folded into the leaf's running mean by one fused, jitted
XLA kernel, `outer.fold_into_mean` (``mean ← (1 − w/W) · mean + w/W · decode(x)`` with the f32
running total W of `outer.running_fractions`), whose mean buffer is donated. The
in-memory path of the simulation uses the same kernel and factors: the two agree bit for bit.

Memory: the f32 mean of the model (O(model)) plus at most max(budget, 2 × the largest
single-silo leaf) of read results, plus TensorStore's transient buffers for the reads in
flight (compressed and decoded chunks: measured ~1.5× the budget) — independent of the number
of silos. glibc keeps some freed buffers below its 32 MB mmap threshold in per-thread arenas
(slack bounded by the thread count, reused round after round); an aggregator process that
must not carry it can run with MALLOC_MMAP_THRESHOLD_=4194304.

Read count per accepted update: `validate_update` reads every array once (checksums, finite,
norm) and `stream_weighted_mean` once more: two reads, never three. Pass the manifests
`validate_update` returned as `manifests=` so the manifests and markers are not fetched again;
`verify_sha256=True` re-hashes the data during the aggregation read itself (CPU, no extra
I/O), which detects an update changed between validation and aggregation.

Silos with weight 0 are not read (the in-memory path adds them with factor 0, a no-op for
finite data).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm import outer
from fedjax_lm.store import arrays as arrays_lib
from fedjax_lm.store import updates as updates_lib
from fedjax_lm.store import validate as validate_lib

PyTree = Any


def _by_param(manifest: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for a in manifest["arrays"]:
        param, field = arrays_lib.param_keypath(a["keypath"])
        out.setdefault(param, {})[field] = a
    return out


def _leaf_fields(index: dict[str, dict[str, Any]], param: str, shape: tuple[int, ...], silo: str, round: int):
    """The manifest entries encoding `param`: {'x': e} or {'q': e, 'scale': e}, shape-checked."""
    found = index.get(param, {})
    size = math.prod(shape)
    if set(found) == {"x"}:
        if tuple(found["x"]["shape"]) != shape:
            raise validate_lib.UpdateRejected(
                silo, round, f"param {param!r} has shape {found['x']['shape']}, expected {list(shape)}"
            )
        return found
    if set(found) == {"q", "scale"}:
        qshape = found["q"]["shape"]
        n_blocks, block = qshape if len(qshape) == 2 else (-1, -1)
        ok = (
            found["q"]["dtype"] == "int8"
            and block >= 1
            and n_blocks == -(-size // block)
            and block <= max(size, 1)
            and found["scale"]["shape"] == [n_blocks]
        )
        if not ok:
            raise validate_lib.UpdateRejected(
                silo,
                round,
                f"param {param!r}: int8 payload q{found['q']['shape']} scale{found['scale']['shape']} "
                f"does not fit shape {list(shape)}",
            )
        return found
    raise validate_lib.UpdateRejected(
        silo, round, f"param {param!r} has payload arrays {sorted(found)}; expected x or q+scale"
    )


def stream_weighted_mean(
    store: Any,
    round: int,
    weights: Mapping[str, float],
    like_params: PyTree,
    *,
    manifests: Mapping[str, dict[str, Any]] | None = None,
    verify_sha256: bool = False,
    read_budget_bytes: int | None = None,
    return_stats: bool = False,
) -> PyTree | tuple[PyTree, dict[str, Any]]:
    """Token-weighted mean (f32 jax arrays shaped like `like_params`) of the committed
    updates of `round` from the silos in `weights` ({silo: tokens}), streamed leaf by leaf.

    `read_budget_bytes` (default: the store's) bounds the read data in flight.
    Leaves of `like_params` that carry a sharding (arrays, or ShapeDtypeStructs with one)
    are placed with it. Raises ValueError if the total weight is not positive, and
    UpdateRejected if an update cannot be read or decoded (or, with `verify_sha256`, no
    longer matches its manifest).
    """
    t0 = time.perf_counter()
    for silo, w in weights.items():
        if not (isinstance(w, (int, float, np.number)) and np.isfinite(np.float32(w)) and w >= 0):
            raise ValueError(f"weight of silo {silo!r} must be a finite float32 number >= 0, got {w!r}")
    silos = [s for s, w in weights.items() if w > 0]
    if not silos:
        raise ValueError(
            f"weighted mean of round {round} is empty (total weight 0): no silo contributed tokens"
        )
    fracs = dict(zip(silos, outer.running_fractions([float(weights[s]) for s in silos])))
    manifests = dict(manifests or {})
    for s in silos:
        if s not in manifests:
            manifests[s] = validate_lib.load_manifest(store.objects, round, s)

    flat, treedef = jax.tree_util.tree_flatten_with_path(like_params)
    leaves = [(arrays_lib.keypath_str(p), tuple(x.shape), getattr(x, "sharding", None)) for p, x in flat]

    # Plan (leaf-major, silo-minor) and open every array up front (metadata only).
    index = {s: _by_param(manifests[s]) for s in silos}
    plan = []
    for param, shape, _ in leaves:
        for s in silos:
            fields = _leaf_fields(index[s], param, shape, s, round)
            opened = {
                f: updates_lib.open_array(store.objects, store.context, round, s, e)
                for f, e in fields.items()
            }
            plan.append((param, shape, s, fields, opened))

    def start(fields, opened):
        return arrays_lib.Waiter([opened[f].result().read() for f in sorted(fields)])

    items = [
        (
            sum(math.prod(e["shape"]) * np.dtype(e["dtype"]).itemsize for e in fields.values()),
            functools.partial(start, fields, opened),
        )
        for _, _, _, fields, opened in plan
    ]
    reader = arrays_lib.BoundedReader(
        store.read_budget_bytes if read_budget_bytes is None else read_budget_bytes
    )
    means: dict[str, jax.Array] = {}
    for (param, shape, silo, fields, _), (_, data) in zip(plan, reader.run(items)):
        if isinstance(data, Exception):
            raise validate_lib.UpdateRejected(
                silo, round, f"param {param!r} cannot be read or decoded: {validate_lib.short_error(data)}"
            )
        arrays = dict(zip(sorted(fields), data))
        if verify_sha256:
            _verify(arrays, fields, silo, round)
        # The in-memory aggregation (outer.mean_of_payloads) folds with the same
        # kernel and factors, so both paths give bit-identical means.
        zeros = means.pop(param) if param in means else jnp.zeros(shape, jnp.float32)
        mean = outer.fold_into_mean(zeros, arrays, fracs[silo])
        # Wait for the kernel: otherwise async dispatch would queue device copies of many
        # silos' leaves (memory growing with the silo count). Reads are already in flight.
        means[param] = mean.block_until_ready()
        del arrays, data, mean

    out = []
    for param, _, sharding in leaves:
        m = means[param]
        if sharding is not None:
            m = jax.device_put(m, sharding)
        out.append(m)
    jax.block_until_ready(out)
    result = jax.tree_util.tree_unflatten(treedef, out)
    if not return_stats:
        return result
    stats = {
        "silos": len(silos),
        "bytes_read": reader.read_bytes,
        "peak_read_bytes": reader.peak_bytes,
        "reads": reader.items,
        "seconds": time.perf_counter() - t0,
    }
    return result, stats


def _verify(arrays: dict[str, np.ndarray], fields: dict[str, dict[str, Any]], silo: str, round: int) -> None:
    for f, x in arrays.items():
        for r in fields[f]["regions"]:
            part = x[arrays_lib.region_slices(r["origin"], r["shape"])]
            if arrays_lib.sha256_hex(part) != r["sha256"]:
                raise validate_lib.UpdateRejected(
                    silo, round, f"array {fields[f]['keypath']!r} changed since validation (sha256 mismatch)"
                )

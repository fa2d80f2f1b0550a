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

Robust rules (`federation.aggregation` = "median" | "trimmed_mean", see `fedjax_lm.robust`):
`stream_robust_aggregate` reads, leaf by leaf, every accepted silo's copy of the leaf at once
(one bounded read item per leaf) and reduces them with the rule's jitted kernel
(`robust.median_leaf` / `robust.trimmed_mean_leaf`), the kernel the in-memory path calls on the
same payloads: the two agree bit for bit. The same reads, shape checks, sha256 re-hashing and
`UpdateRejected(silo, ...)` on a failed read as the mean. Memory: the f32 result of the model plus
K copies of one leaf's payload (at most two leaves' worth: the one reduced and the next in flight,
or the read budget if larger) plus TensorStore's transient buffers — K × the largest leaf, never
K × the model (benchmarks/robust_aggregate.py measures it). `stream_aggregate` dispatches on the rule.
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
from fedjax_lm import robust
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
    silos = _contributors(round, weights)
    fracs = dict(zip(silos, outer.running_fractions([float(weights[s]) for s in silos])))
    leaves, treedef, opened = _open_leaves(store, round, silos, like_params, manifests)
    plan = [
        (param, shape, s, fields, arrays) for param, shape, _ in leaves for s, fields, arrays in opened[param]
    ]

    def start(fields, opened):
        return arrays_lib.Waiter([opened[f].result().read() for f in sorted(fields)])

    items = [(_nbytes(fields), functools.partial(start, fields, opened)) for _, _, _, fields, opened in plan]
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

    return _finish(leaves, treedef, means, silos, reader, t0, return_stats)


def _contributors(round: int, weights: Mapping[str, float], what: str = "weighted mean") -> list[str]:
    """The silos read, in the order of `weights`: those of weight > 0 (weights checked)."""
    for silo, w in weights.items():
        if not (isinstance(w, (int, float, np.number)) and np.isfinite(np.float32(w)) and w >= 0):
            raise ValueError(f"weight of silo {silo!r} must be a finite float32 number >= 0, got {w!r}")
    silos = [s for s, w in weights.items() if w > 0]
    if not silos:
        raise ValueError(f"{what} of round {round} is empty (total weight 0): no silo contributed tokens")
    return silos


def _open_leaves(store: Any, round: int, silos: list[str], like_params: PyTree, manifests):
    """(leaves [(param, shape, sharding)], treedef, {param: [(silo, fields, opened arrays)]}).

    Every array is opened up front (metadata only), leaf-major and silo-minor; a missing or
    misshapen entry raises UpdateRejected naming its silo."""
    manifests = dict(manifests or {})
    for s in silos:
        if s not in manifests:
            manifests[s] = validate_lib.load_manifest(store.objects, round, s)
    flat, treedef = jax.tree_util.tree_flatten_with_path(like_params)
    leaves = [(arrays_lib.keypath_str(p), tuple(x.shape), getattr(x, "sharding", None)) for p, x in flat]
    index = {s: _by_param(manifests[s]) for s in silos}
    opened: dict[str, list[tuple[str, dict[str, Any], dict[str, Any]]]] = {}
    for param, shape, _ in leaves:
        row = opened.setdefault(param, [])
        for s in silos:
            fields = _leaf_fields(index[s], param, shape, s, round)
            arrays = {
                f: updates_lib.open_array(store.objects, store.context, round, s, e)
                for f, e in fields.items()
            }
            row.append((s, fields, arrays))
    return leaves, treedef, opened


def _nbytes(fields: dict[str, dict[str, Any]]) -> int:
    return sum(math.prod(e["shape"]) * np.dtype(e["dtype"]).itemsize for e in fields.values())


def _finish(leaves, treedef, values: dict[str, jax.Array], silos, reader, t0: float, return_stats: bool):
    """The result tree (leaves placed with the template's shardings) and, if asked, the stats."""
    out = []
    for param, _, sharding in leaves:
        m = values[param]
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


class _LeafReads:
    """Every silo's reads of one leaf, issued together; `result()` lists, per silo, its
    {field: array} or the exception that stopped its read (so the failure names its silo)."""

    def __init__(self, row: list[tuple[str, dict[str, Any], dict[str, Any]]]):
        self.pending: list[Any] = []
        for _, fields, opened in row:
            try:
                self.pending.append([(f, opened[f].result().read()) for f in sorted(fields)])
            except Exception as e:  # noqa: BLE001 - reported for its silo
                self.pending.append(e)

    def result(self) -> list[dict[str, np.ndarray] | Exception]:
        out: list[dict[str, np.ndarray] | Exception] = []
        for reads in self.pending:
            if isinstance(reads, Exception):
                out.append(reads)
                continue
            try:
                out.append({f: future.result() for f, future in reads})
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out


def stream_robust_aggregate(
    store: Any,
    round: int,
    weights: Mapping[str, float],
    like_params: PyTree,
    *,
    rule: str,
    trim_fraction: float = robust.DEFAULT_TRIM_FRACTION,
    manifests: Mapping[str, dict[str, Any]] | None = None,
    verify_sha256: bool = False,
    read_budget_bytes: int | None = None,
    return_stats: bool = False,
) -> PyTree | tuple[PyTree, dict[str, Any]]:
    """The coordinate-wise `rule` ("median" or "trimmed_mean", `fedjax_lm.robust`) of the committed
    updates of `round` from the silos of weight > 0 in `weights`, as f32 jax arrays shaped (and,
    where the template has shardings, placed) like `like_params`.

    Unweighted: each silo of positive weight counts once, whatever its tokens; the order of
    `weights` is the order the in-memory path gets the same silos in. Raises ValueError if no
    silo has a positive weight, and UpdateRejected (naming the silo) if an update cannot be read
    or decoded or, with `verify_sha256`, no longer matches its manifest.
    """
    if rule not in robust.RULES or rule == "mean":
        raise ValueError(f"stream_robust_aggregate takes 'median' or 'trimmed_mean', got {rule!r}")
    t0 = time.perf_counter()
    silos = _contributors(round, weights, rule)
    leaves, treedef, opened = _open_leaves(store, round, silos, like_params, manifests)
    items = [
        (sum(_nbytes(fields) for _, fields, _ in opened[param]), functools.partial(_LeafReads, opened[param]))
        for param, _, _ in leaves
    ]
    reader = arrays_lib.BoundedReader(
        store.read_budget_bytes if read_budget_bytes is None else read_budget_bytes
    )
    values: dict[str, jax.Array] = {}
    for (param, shape, _), (_, data) in zip(leaves, reader.run(items)):
        copies = []
        for (silo, fields, _), got in zip(opened[param], data):
            if isinstance(got, Exception):
                raise validate_lib.UpdateRejected(
                    silo, round, f"param {param!r} cannot be read or decoded: {validate_lib.short_error(got)}"
                )
            if verify_sha256:
                _verify(got, fields, silo, round)
            copies.append(got)
        # The in-memory path (robust.robust_of_payloads) calls the same kernel on the same
        # payloads in the same silo order: bit-identical results.
        values[param] = robust.reduce_leaf(rule, copies, shape, trim_fraction).block_until_ready()
        del copies, data
    return _finish(leaves, treedef, values, silos, reader, t0, return_stats)


def stream_aggregate(
    store: Any,
    round: int,
    weights: Mapping[str, float],
    like_params: PyTree,
    *,
    rule: str = "mean",
    trim_fraction: float = robust.DEFAULT_TRIM_FRACTION,
    **kwargs: Any,
) -> PyTree | tuple[PyTree, dict[str, Any]]:
    """The aggregate of `federation.aggregation`'s `rule` streamed from the store: the token-weighted
    `stream_weighted_mean` for "mean", `stream_robust_aggregate` for the robust rules. `kwargs`:
    manifests, verify_sha256, read_budget_bytes, return_stats."""
    if rule == "mean":
        return stream_weighted_mean(store, round, weights, like_params, **kwargs)
    return stream_robust_aggregate(
        store, round, weights, like_params, rule=rule, trim_fraction=trim_fraction, **kwargs
    )


def stream_ring_sum(
    store: Any,
    round: int,
    silos: list[str],
    like_params: PyTree,
    dtype: Any,
    *,
    manifests: Mapping[str, dict[str, Any]] | None = None,
    verify_sha256: bool = True,
    read_budget_bytes: int | None = None,
) -> PyTree:
    """Σ of the silos' masked ring payloads mod 2^b (NumPy arrays of `dtype`, shaped like
    `like_params`), streamed leaf by leaf (secure aggregation, `fedjax_lm.secure`).

    The same reads, shape checks, sha256 re-hashing and `UpdateRejected(silo, ...)` as the mean;
    each array must have the ring's dtype. Memory: one sum of the model plus the reads in flight.
    """
    dtype = np.dtype(dtype)
    if not silos:
        raise ValueError(f"ring sum of round {round} is empty: no silo to sum")
    leaves, treedef, opened = _open_leaves(store, round, list(silos), like_params, manifests)
    plan = [
        (param, shape, s, fields, arrays) for param, shape, _ in leaves for s, fields, arrays in opened[param]
    ]
    for _, _, s, fields, _ in plan:
        if set(fields) != {"x"} or fields["x"]["dtype"] != dtype.name:
            raise validate_lib.UpdateRejected(s, round, f"not a {dtype.name} ring payload ({sorted(fields)})")

    def start(opened):
        return opened["x"].result().read()

    items = [(_nbytes(fields), functools.partial(start, arrays)) for _, _, _, fields, arrays in plan]
    reader = arrays_lib.BoundedReader(
        store.read_budget_bytes if read_budget_bytes is None else read_budget_bytes
    )
    sums: dict[str, np.ndarray] = {}
    for (param, shape, silo, fields, _), (_, data) in zip(plan, reader.run(items)):
        if isinstance(data, Exception):
            raise validate_lib.UpdateRejected(
                silo, round, f"param {param!r} cannot be read or decoded: {validate_lib.short_error(data)}"
            )
        if verify_sha256:
            _verify({"x": data}, fields, silo, round)
        if param in sums:
            np.add(sums[param], data, out=sums[param], dtype=dtype)  # wraps mod 2^b
        else:
            sums[param] = np.array(data, dtype=dtype, copy=True)
        del data
    return jax.tree_util.tree_unflatten(treedef, [sums[param] for param, _, _ in leaves])


def _verify(arrays: dict[str, np.ndarray], fields: dict[str, dict[str, Any]], silo: str, round: int) -> None:
    for f, x in arrays.items():
        for r in fields[f]["regions"]:
            part = x[arrays_lib.region_slices(r["origin"], r["shape"])]
            if arrays_lib.sha256_hex(part) != r["sha256"]:
                raise validate_lib.UpdateRejected(
                    silo, round, f"array {fields[f]['keypath']!r} changed since validation (sha256 mismatch)"
                )

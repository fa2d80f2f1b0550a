"""Compression of the pseudo-gradient upload, with error feedback.

Methods
-------
* ``none``  — f32, exact.
* ``bf16``  — round-to-nearest-even to bfloat16: relative error <= 2**-8 per element
  (normal numbers), half the bytes.
* ``int8``  — symmetric block-wise quantisation. Each leaf is flattened and cut into blocks
  of ``block_size`` consecutive elements (the last block zero-padded); per block
  ``scale = max|x| / 127`` (f32) and ``q = round(x / scale)`` in [-127, 127] (int8), decoded
  as ``q * scale``: error <= scale / 2 per element. A block of zeros has scale 0 and decodes
  to exact zeros (no division by zero).

Default ``block_size = 256``: the scales cost 4/256 = 1.6 % on top of the int8 bytes
(3.94x smaller than f32), while one outlier only coarsens the 255 values sharing its block
(a per-leaf scale would flatten a whole matrix to zeros around one large entry). LM weight
leaves have sizes that are multiples of 256, so padding is rare and happens only in each
leaf's last block. Leaves smaller than a block (norm scales, scalars) use one block of
their own size instead of padding to 256.

Payload layout
--------------
The payload is a pytree of plain arrays with the delta's structure, each leaf replaced by a
dict (so a writer can store it array by array, e.g. as ``<leaf path>/q``)::

    none:  {"x": f32[*shape]}
    bf16:  {"x": bf16[*shape]}
    int8:  {"q": int8[n_blocks, block], "scale": f32[n_blocks]}
           block = min(block_size, size) (1 for an empty leaf), n_blocks = ceil(size / block)

The method is recovered from the payload itself (keys and dtype), the block from
``q.shape[1]``; the only static information not in the arrays is each leaf's original shape,
which ``decompress(payload, like)`` takes from a template tree (the global params, or their
``jax.ShapeDtypeStruct``s — the aggregator always has them). ``decompress`` checks that the
payload is consistent with the template, so a payload cannot be decoded into the wrong shape.

Error feedback: ``compress`` quantises ``y = delta + error`` and returns the residual
``new_error = y − decompress(payload)``. Over T rounds the decoded payloads then sum to
``Σ delta − error_T``: the quantisation error does not accumulate.

All of ``compress`` (with ``method`` and ``block_size`` static) and ``decompress`` (template
closed over or passed as arrays) are jit-able; leaves are processed one at a time.

Sharding: ``none``/``bf16`` are elementwise and keep every leaf's sharding. For ``int8``
under an Explicit mesh (jax 0.10's default), a leaf sharded on its leading axis only, whose
shards hold whole blocks (e.g. fsdp-sharded matrices), keeps that sharding in ``q``/``scale``;
any other layout is gathered (replicated) for the quantisation. Decoded deltas and the error
state are placed back with the template's / input's sharding. Under Auto axes XLA chooses.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any

METHODS = ("none", "bf16", "int8")
DEFAULT_BLOCK_SIZE = 256
_QMAX = 127.0


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; valid: {', '.join(METHODS)}")


def _block_geometry(size: int, block_size: int) -> tuple[int, int]:
    """(n_blocks, block) for a leaf of `size` elements."""
    block = max(1, min(block_size, size))
    return -(-size // block), block


def init_error(template: PyTree) -> PyTree:
    """Zero error-feedback state (f32) shaped and, eagerly, sharded like `template` (arrays or
    ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: jnp.zeros_like(x, dtype=jnp.float32), template)


def _explicit_sharding(x: Any) -> NamedSharding | None:
    """`x`'s sharding if it lives on a mesh with Explicit axes (reshapes then need one), else None."""
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
    else:
        sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if not isinstance(sharding, NamedSharding) or mesh is None or mesh.empty:
        return None
    if AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    return sharding


def _aligned_lead(sharding: NamedSharding, shape: tuple[int, ...], block: int) -> Any:
    """The spec entry sharding `shape`'s leading axis if only that axis is sharded and every
    shard holds whole blocks (so a row-major reshape to blocks keeps the sharding), else None."""
    spec = tuple(sharding.spec)
    if not shape or not spec or spec[0] is None or any(a is not None for a in spec[1:]):
        return None
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    n = math.prod(sharding.mesh.shape[a] for a in axes)
    size = math.prod(shape)
    if shape[0] % n or (size // n) % block:
        return None
    return spec[0]


def _to_blocks(y: jax.Array, n_blocks: int, block: int) -> jax.Array:
    """Leaf -> f32[n_blocks, block] (zero-padded). Under explicit sharding a leading-axis
    sharding is kept when shards hold whole blocks; other layouts are gathered first."""
    sharding = _explicit_sharding(y)
    if sharding is not None:
        lead = _aligned_lead(sharding, tuple(y.shape), block)
        if lead is not None:
            return jnp.reshape(y, (n_blocks, block), out_sharding=NamedSharding(sharding.mesh, P(lead, None)))
        y = jax.sharding.reshard(y, NamedSharding(sharding.mesh, P()))
    flat = y.reshape(-1)
    pad = n_blocks * block - y.size
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(n_blocks, block)


def _from_blocks(x: jax.Array, shape: tuple[int, ...], target: NamedSharding | None) -> jax.Array:
    """f32[n_blocks, block] -> leaf of `shape` (padding dropped), placed like `target` if given."""
    size = math.prod(shape)
    sharding = _explicit_sharding(x)
    if sharding is None:
        return x.reshape(-1)[:size].reshape(shape)
    lead = _aligned_lead(sharding, shape, x.shape[1]) if x.size == size else None
    if lead is not None:
        spec = P(lead, *([None] * (len(shape) - 1)))
        out = jnp.reshape(x, shape, out_sharding=NamedSharding(sharding.mesh, spec))
    else:
        x = jax.sharding.reshard(x, NamedSharding(sharding.mesh, P()))
        out = x.reshape(-1)[:size].reshape(shape)
    if target is not None:
        out = jax.sharding.reshard(out, target)
    return out


def _quantize_int8(y: jax.Array, block_size: int) -> dict[str, jax.Array]:
    n_blocks, block = _block_geometry(y.size, block_size)
    x = _to_blocks(y, n_blocks, block)
    scale = jnp.max(jnp.abs(x), axis=1) / _QMAX
    # XLA:CPU's vectorised max may drop NaNs; a block with a NaN/Inf must keep a non-finite
    # scale so the update is rejected downstream instead of silently zeroing the bad values.
    scale = jnp.where(jnp.all(jnp.isfinite(x), axis=1), scale, jnp.nan)
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x / safe[:, None]), -_QMAX, _QMAX).astype(jnp.int8)
    return {"q": q, "scale": scale}


def _decode_leaf(like: Any, p: dict[str, jax.Array]) -> jax.Array:
    """One payload leaf -> f32 array of `like.shape`, after checking they match."""
    shape = tuple(like.shape)
    size = math.prod(shape)
    if set(p) == {"x"}:
        x = p["x"]
        if tuple(x.shape) != shape:
            raise ValueError(f"payload leaf has shape {tuple(x.shape)}, template {shape}")
        if x.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"payload leaf 'x' has dtype {x.dtype}; expected float32 or bfloat16")
        return x.astype(jnp.float32)
    if set(p) == {"q", "scale"}:
        q, scale = p["q"], p["scale"]
        if q.dtype != jnp.int8 or q.ndim != 2 or tuple(scale.shape) != (q.shape[0],):
            raise ValueError(
                f"int8 payload leaf malformed: q {q.dtype}{tuple(q.shape)}, scale {tuple(scale.shape)}"
            )
        n_blocks, block = q.shape
        if n_blocks != -(-size // block) or block > max(size, 1):
            raise ValueError(
                f"int8 payload of {n_blocks} blocks of {block} does not fit template shape {shape}"
            )
        x = q.astype(jnp.float32) * scale.astype(jnp.float32)[:, None]
        return _from_blocks(x, shape, _explicit_sharding(like))
    raise ValueError(f"payload leaf has keys {sorted(p)}; expected {{'x'}} or {{'q', 'scale'}}")


def compress(
    delta: PyTree,
    error: PyTree | None = None,
    method: str = "int8",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[PyTree, PyTree]:
    """Compresses `delta + error`; returns `(payload, new_error)` (see module docstring).

    `error=None` means no feedback state (zeros). Jit with `static_argnames=("method",
    "block_size")`. `new_error` equals `delta + error − decompress(payload)` up to one ulp of
    the largest element of a block (XLA:CPU contracts `y − q·scale` into an FMA under jit).
    Non-finite inputs are not filtered here (validate with `outer.delta_stats`).
    """
    _check_method(method)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if error is None:
        error = init_error(delta)

    def leaf(d, e):
        y = d.astype(jnp.float32) + e.astype(jnp.float32)
        if method == "none":
            p = {"x": y}
        elif method == "bf16":
            p = {"x": y.astype(jnp.bfloat16)}
        else:
            p = _quantize_int8(y, block_size)
        return p, y - _decode_leaf(y, p)

    out = jax.tree.map(leaf, delta, error)
    payload = jax.tree.map(lambda _, o: o[0], delta, out)
    new_error = jax.tree.map(lambda _, o: o[1], delta, out)
    return payload, new_error


def decompress(payload: PyTree, like: PyTree) -> PyTree:
    """The f32 delta encoded by `payload`, with the leaf shapes of the template `like`."""
    return jax.tree.map(_decode_leaf, like, payload)


def _nbytes(x: Any) -> int:
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def payload_nbytes(payload: PyTree) -> int:
    """Bytes of the arrays a writer stores (q incl. padding, scales); works on ShapeDtypeStructs."""
    return sum(_nbytes(x) for x in jax.tree.leaves(payload))


def raw_nbytes(delta: PyTree) -> int:
    """Bytes of the uncompressed delta as given (f32: 4 per element)."""
    return sum(_nbytes(x) for x in jax.tree.leaves(delta))

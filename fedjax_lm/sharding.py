"""Meshes, logical-axis rules and placement of params, optimizer state and batches.

A silo runs on a `Mesh` with three axes:
  data   - pure data parallelism (params replicated),
  fsdp   - data parallelism with params and optimizer state sharded (ZeRO-3 style),
  tensor - tensor (model) parallelism over heads / MLP / vocabulary.

Model code names the axes of every parameter and activation logically ('embed',
'heads', 'mlp', 'batch', ...). The config maps logical names to mesh axes
(`config.sharding.rules`), so changing the parallelism never touches model code.

A dimension whose size is not divisible by the mesh axes it maps to is replicated
along those axes instead (and reported by `explain`), so a tiny test model runs on
any mesh and a large model shards exactly as the rules say.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Batch is split over every data-like axis; params are
# split over fsdp (their 'embed' side) and tensor (heads / mlp / vocab).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
)

Rules = Sequence[tuple[str, Any]]


def maybe_initialize_distributed() -> bool:
    """Starts `jax.distributed` when FEDJAX_DISTRIBUTED=1 (multi-host silo, e.g. a TPU pod slice).

    On TPU VMs `jax.distributed.initialize()` discovers the coordinator itself; elsewhere
    set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    if os.environ.get("FEDJAX_DISTRIBUTED", "0") not in ("1", "true", "True"):
        return False
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)
    return True


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int | None = None) -> tuple[int, int, int]:
    """Resolves a mesh config {data, fsdp, tensor}; one axis may be -1 (use the remaining devices)."""
    n = jax.device_count() if num_devices is None else num_devices
    unknown = set(mesh_cfg) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh config has unknown axes {sorted(unknown)}; valid axes are {MESH_AXES}")
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh config {dict(mesh_cfg)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh config {dict(mesh_cfg)}: axis sizes must be positive or -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ValueError(f"mesh config {dict(mesh_cfg)} does not divide the {n} available devices")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) > n:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {n} are available"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes (shardings come from jit in/out shardings)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    if math.prod(shape) < len(devices):
        logging.warning("mesh %s uses %d of the %d devices", shape, math.prod(shape), len(devices))
        devices = devices[: math.prod(shape)]
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def normalize_rules(rules: Rules | None) -> tuple[tuple[str, Any], ...]:
    """Rules from config (lists from ConfigDicts) as a tuple of (name, axes) pairs."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for item in rules:
        if len(item) != 2:
            raise ValueError(f"sharding rule {item!r} must be a (logical_name, mesh_axes) pair")
        name, axes = item
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in axes if isinstance(axes, tuple) else (axes,):
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"sharding rule for {name!r} names unknown mesh axis {a!r}")
        out.append((name, axes))
    return tuple(out)


def logical_to_mesh_spec(
    logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Rules
) -> P:
    """Maps a logical spec to a mesh PartitionSpec, replicating dims that do not divide."""
    if logical is None:
        return P()
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match the array rank of shape {tuple(shape)}")
    rule_map: dict[str, Any] = {}
    for name, axes in rules:
        rule_map.setdefault(name, axes)
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        axes = rule_map.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        # Keep the axes not yet used by another dim, of size > 1, that divide the dim.
        kept: list[str] = []
        for a in axes:
            size = mesh.shape[a]
            if a in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[k] for k in kept) * size) == 0:
                kept.append(a)
        used.update(kept)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*out)


def logical_axes(boxed_tree: Any) -> Any:
    """The logical axis names of every leaf of a tree of `nn.Partitioned` (None where unnamed)."""

    def names(x):
        return tuple(x.names) if isinstance(x, nn.Partitioned) else None

    return jax.tree.map(names, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def tree_shardings(abstract_tree: Any, logical_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of arrays given a matching tree of logical names."""
    leaves, treedef = jax.tree.flatten(abstract_tree)
    logical_leaves = treedef.flatten_up_to(logical_tree)
    specs = [
        NamedSharding(mesh, logical_to_mesh_spec(lg, x.shape, mesh, rules))
        for x, lg in zip(leaves, logical_leaves)
    ]
    return jax.tree.unflatten(treedef, specs)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: the abstract targets Orbax restores onto."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
    )


def optimizer_shardings(tx: Any, abstract_opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """An optax state's shardings: leaves shaped like params follow them; counters are replicated."""
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt_state, param_shardings, transform_non_params=lambda _: replicated
    )


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Batches are [B, L] (or [A, B, L] with accumulation): split B over the batch axes."""
    rule_map = dict(rules)
    axes = rule_map.get("batch")
    axes = tuple(
        a for a in (axes if isinstance(axes, tuple) else (axes,)) if a is not None and mesh.shape[a] > 1
    )
    spec = [None] * ndim
    spec[ndim - 2] = axes if axes else None
    return NamedSharding(mesh, P(*spec))


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Places a global host batch on the mesh.

    Every host of a multi-host silo reads the same global batch (the data pipeline is
    seeded identically) and contributes only the rows its devices hold, so no host needs
    the others' data and the global batch is the same as on one host.
    """
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if jax.process_count() > 1:
            index = sharding.addressable_devices_indices_map(v.shape)
            rows = sorted({(i[-2].start or 0, i[-2].stop or v.shape[-2]) for i in index.values()})
            lo, hi = rows[0][0], rows[-1][1]
            v = v[..., lo:hi, :]
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def explain(abstract_tree: Any, shardings: Any) -> list[str]:
    """One line per leaf: path, shape and its mesh spec (for logs and `compile`)."""
    lines = []
    for (path, x), s in zip(
        jax.tree_util.tree_flatten_with_path(abstract_tree)[0], jax.tree.leaves(shardings)
    ):
        lines.append(f"{jax.tree_util.keystr(path)} {tuple(x.shape)} {s.spec}")
    return lines


def log_replicated_fallbacks(abstract_tree: Any, logical_tree: Any, mesh: Mesh, rules: Rules) -> int:
    """Logs dims that a rule wanted sharded but that had to be replicated; returns how many."""
    count = 0
    leaves, treedef = jax.tree.flatten(abstract_tree)
    for x, lg in zip(leaves, treedef.flatten_up_to(logical_tree)):
        if lg is None:
            continue
        spec = logical_to_mesh_spec(lg, x.shape, mesh, rules)
        full = logical_to_mesh_spec(lg, [0] * len(x.shape), mesh, rules)  # 0 divides by anything
        if spec != full:
            count += 1
            logging.debug("replicated (not divisible): %s %s wanted %s got %s", lg, x.shape, full, spec)
    return count


def unbox(boxed_tree: Any) -> Any:
    """Plain arrays from a tree of `nn.Partitioned`, without flax's own sharding constraint.

    Placement is decided by `tree_shardings` (which replicates indivisible dims) and the
    jit's out_shardings, so the box's constraint must not be applied a second time.
    """
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
        boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )

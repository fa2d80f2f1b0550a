"""One silo's training: state, the pure train/eval steps, H local steps, sharded set-up.

Everything here is a pure function of pytrees. `Silo` binds a model, an optimizer and
a mesh into jitted, sharded versions of those functions; the centralized trainer, the
one-process federation and the multi-process silo all call the same ones.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lm import model as model_lib
from fedjax_lm import optim
from fedjax_lm import sharding as sharding_lib

Batch = Mapping[str, jax.Array]  # {'inputs': int32[B, L], 'targets': int32[B, L]}

_ACCELERATOR_PLUGINS = (
    "libtpu",
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm60_plugin",
    "jax_rocm7_plugin",
)


def keep_freed_memory_on_cpu() -> bool:
    """On a CPU-only host with glibc, keep freed memory in the process instead of returning it to the OS.

    XLA:CPU allocates a train step's temporaries (hundreds of MB to GB) afresh on every run; glibc
    serves them with mmap and unmaps them when freed, so each step first-touches every page again:
    ~180k minor page faults a step for the tiny preset at 4x1024, ~900k for small (measured in
    benchmarks/profile_step.py), 10-25% of the step. One arena, no mmap and no trimming of the heap's
    top make the freed temporaries reusable (docs/performance.md; a 2 GiB trim threshold, the largest
    `mallopt` takes, still left small 4x1024 at 670k faults a step: its temporaries are larger). The
    cost: the process keeps its peak heap. Done once, at import, before XLA starts its threads;
    FEDJAX_LM_MALLOPT=0 turns it off, and it is skipped where an accelerator plugin is installed.
    """
    import ctypes
    import importlib.util
    import os
    import sys

    if os.environ.get("FEDJAX_LM_MALLOPT", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if any(importlib.util.find_spec(p) is not None for p in _ACCELERATOR_PLUGINS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
        return bool(
            libc.mallopt(M_ARENA_MAX, 1)
            and libc.mallopt(M_MMAP_MAX, 0)
            and libc.mallopt(M_TRIM_THRESHOLD, -1)  # -1: never trim (glibc's mallopt(3))
        )
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False


MALLOC_TUNED = keep_freed_memory_on_cpu()


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken by this state
    params: Any
    opt_state: Any


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of tokens), in float32."""
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), targets_BxL
    )
    return losses_BxL.sum(), jnp.asarray(losses_BxL.size, jnp.float32)


def loss_fn(params: Any, batch: Batch, model: nn.Module) -> tuple[jax.Array, jax.Array]:
    logits_BxLxV = model.apply({"params": params}, batch["inputs"])
    total, count = cross_entropy(logits_BxLxV, batch["targets"])
    return total / count, count


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
    grad_accum: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; with grad_accum=A the batch's B rows are split into A micro-batches."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss, tokens), grads = grad_fn(state.params, batch, model)
    else:
        micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

        def accumulate(carry, mb):
            (l, t), g = grad_fn(state.params, mb, model)
            loss_sum, tok_sum, g_sum = carry
            return (loss_sum + l, tok_sum + t, jax.tree.map(jnp.add, g_sum, g)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (loss, tokens, grads), _ = jax.lax.scan(accumulate, (0.0, 0.0, zeros), micro)
        loss = loss / grad_accum
        grads = jax.tree.map(lambda g: g / grad_accum, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "tokens": tokens,
    }
    if schedule is not None:
        metrics["lr"] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def local_train(state: TrainState, batches: Batch, *, step_fn) -> tuple[TrainState, dict[str, jax.Array]]:
    """H local steps over stacked batches [H, B, L] with `lax.scan`; metrics are stacked [H]."""
    return jax.lax.scan(lambda s, b: step_fn(s, b), state, batches)


def eval_step(params: Any, batch: Batch, *, model: nn.Module) -> dict[str, jax.Array]:
    """Sum of token losses and token count (sum across batches, then exp(sum/count) = ppl)."""
    logits_BxLxV = model.apply({"params": params}, batch["inputs"])
    total, count = cross_entropy(logits_BxLxV, batch["targets"])
    return {"loss_sum": total, "tokens": count}


def from_config(config: Any, total_steps: int, mesh: Mesh | None = None) -> "Silo":
    """The silo runtime a config describes: model, inner optimizer over `total_steps`, mesh, rules."""
    tx, schedule = optim.make_optimizer(config.optim, total_steps)
    return Silo(
        model_lib.ModelConfig.from_dict(config.model),
        tx,
        sharding_lib.make_mesh(config.mesh) if mesh is None else mesh,
        rules=sharding_lib.normalize_rules(config.sharding.rules),
        schedule=schedule,
        grad_accum=int(config.optim.grad_accum),
    )


@dataclasses.dataclass
class Silo:
    """A model + optimizer + mesh, with sharded, jitted state init, train, local-train and eval.

    `state_shardings` follow the logical-axis rules; `init_state` never materialises an
    unsharded copy (eval_shape -> shardings -> jitted init with out_shardings).
    """

    model_config: model_lib.ModelConfig
    tx: optax.GradientTransformation
    mesh: Mesh
    rules: tuple[tuple[str, Any], ...] = sharding_lib.DEFAULT_RULES
    schedule: optax.Schedule | None = None
    grad_accum: int = 1

    def __post_init__(self):
        self.rules = sharding_lib.normalize_rules(self.rules)
        self.model = model_lib.Decoder(self.model_config)
        boxed = jax.eval_shape(lambda: model_lib.init_params(self.model_config, jax.random.key(0)))
        self.param_logical = sharding_lib.logical_axes(boxed)
        self.abstract_params = sharding_lib.unbox(boxed)
        self.param_shardings = sharding_lib.tree_shardings(
            self.abstract_params, self.param_logical, self.mesh, self.rules
        )
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        replicated = NamedSharding(self.mesh, P())
        self.opt_shardings = sharding_lib.optimizer_shardings(
            self.tx, abstract_opt, self.param_shardings, self.mesh
        )
        self.state_shardings = TrainState(
            step=replicated, params=self.param_shardings, opt_state=self.opt_shardings
        )
        self.abstract_state = jax.eval_shape(self._init_state, jax.random.key(0))
        self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules, ndim=2)
        self._jit_cache: dict[str, Any] = {}

    # ---- pure pieces bound to this silo's model and optimizer --------------------------
    def _init_state(self, rng: jax.Array) -> TrainState:
        params = sharding_lib.unbox(model_lib.init_params(self.model_config, rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def _with_rules(self, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with nn.logical_axis_rules(self.rules):
                return fn(*args, **kwargs)

        return wrapped

    @property
    def step_fn(self):
        return self._with_rules(
            functools.partial(
                train_step, model=self.model, tx=self.tx, schedule=self.schedule, grad_accum=self.grad_accum
            )
        )

    def fresh_opt_state(self, params: Any) -> Any:
        """A new inner optimizer state, placed exactly as a restored one (no recompilation)."""
        fn = self._jit("opt_init", self.tx.init, out_shardings=self.opt_shardings)
        with jax.set_mesh(self.mesh):
            return fn(params)

    def zeros_like_params(self, params: Any) -> Any:
        """f32 zeros with the params' shardings (the error-feedback state before round 0)."""
        fn = self._jit(
            "zeros",
            lambda p: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p),
            out_shardings=self.param_shardings,
        )
        with jax.set_mesh(self.mesh):
            return fn(params)

    # ---- jitted, sharded entry points ---------------------------------------------------
    def _jit(self, name, fn, **kw):
        if name not in self._jit_cache:
            self._jit_cache[name] = jax.jit(fn, **kw)
        return self._jit_cache[name]

    def init_state(self, rng: jax.Array) -> TrainState:
        fn = self._jit("init", self._init_state, out_shardings=self.state_shardings)
        with jax.set_mesh(self.mesh):
            return fn(rng)

    def init_params(self, rng: jax.Array) -> Any:
        """The params of `init_state(rng)` alone, placed with the param shardings (no optimizer state)."""
        fn = self._jit(
            "init_params",
            lambda key: sharding_lib.unbox(model_lib.init_params(self.model_config, key)),
            out_shardings=self.param_shardings,
        )
        with jax.set_mesh(self.mesh):
            return fn(rng)

    def abstract_state_with_shardings(self) -> TrainState:
        return sharding_lib.with_shardings(self.abstract_state, self.state_shardings)

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        fn = self._jit(
            "train",
            self.step_fn,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,),
        )
        with jax.set_mesh(self.mesh):
            return fn(state, batch)

    def local_train(self, state: TrainState, batches: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """H steps in one program: batches are [H, B, L]."""
        stacked = sharding_lib.batch_sharding(self.mesh, self.rules, ndim=3)
        fn = self._jit(
            "local",
            functools.partial(local_train, step_fn=self.step_fn),
            in_shardings=(self.state_shardings, stacked),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,),
        )
        with jax.set_mesh(self.mesh):
            return fn(state, batches)

    def local_train_chunk(
        self, state: TrainState, batches: Batch, start: jax.Array, steps: int
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """Steps start .. start+steps-1 of a round whose [H, B, L] batches are already on the mesh.

        One compiled program per chunk length, the state donated from chunk to chunk and the
        batches placed once per round (the chunk is sliced inside the program).
        """
        stacked = sharding_lib.batch_sharding(self.mesh, self.rules, ndim=3)

        def chunk(state, batches, start):
            part = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, steps), batches)
            return local_train(state, part, step_fn=self.step_fn)

        fn = self._jit(
            f"chunk{steps}",
            chunk,
            in_shardings=(self.state_shardings, stacked, None),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,),
        )
        with jax.set_mesh(self.mesh):
            return fn(state, batches, start)

    def eval_step(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        fn = self._jit(
            "eval",
            self._with_rules(functools.partial(eval_step, model=self.model)),
            in_shardings=(self.param_shardings, self.batch_sharding),
        )
        with jax.set_mesh(self.mesh):
            return fn(params, batch)

    def put_batch(self, batch: Mapping[str, np.ndarray], ndim: int = 2) -> dict[str, jax.Array]:
        sharding = (
            self.batch_sharding if ndim == 2 else sharding_lib.batch_sharding(self.mesh, self.rules, ndim)
        )
        return sharding_lib.put_batch(batch, sharding)

    def evaluate(self, params: Any, batches: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
        """Mean loss and perplexity over a list of host batches."""
        total, count = 0.0, 0.0
        outs = [self.eval_step(params, self.put_batch(b)) for b in batches]
        for o in outs:
            total += float(o["loss_sum"])
            count += float(o["tokens"])
        if count == 0:
            raise ValueError("evaluate() got no tokens: the validation split is empty")
        loss = total / count
        return {"loss": loss, "ppl": float(np.exp(loss)), "tokens": count}

    def compile_train_step(self, batch_size: int, seq_len: int):
        """AOT lower + compile of the train step for abstract inputs (no memory used)."""
        abstract_batch = {
            k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=self.batch_sharding)
            for k in ("inputs", "targets")
        }
        fn = jax.jit(
            self.step_fn,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,),
        )
        with jax.set_mesh(self.mesh):
            lowered = fn.lower(self.abstract_state_with_shardings(), abstract_batch)
            return lowered, lowered.compile()

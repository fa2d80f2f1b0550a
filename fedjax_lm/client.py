"""One silo's round as pure functions (fedjax's client_init / client_step / client_final).

`client_init` starts from the global params and the silo's private moments, `silo.local_train`
runs the H local steps, `client_final` turns the result into the upload: the pseudo-gradient
Δ = θ_global − θ_local, compressed with error feedback. `client_round` is the three as one
function; `federation.Federation` runs the same pieces jitted, sharded and in chunks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_lm import compression
from fedjax_lm import outer
from fedjax_lm.silo import TrainState, local_train


@struct.dataclass
class ClientOutput:
    payload: Any  # compressed Δ (what is uploaded)
    error: Any  # error-feedback residual kept by the silo
    opt_state: Any  # the silo's inner optimizer state after the round
    metrics: dict[str, Any]  # per local step: loss, grad_norm, tokens, lr
    keys: Any = None  # FedPer: the silo's own trained key layers (they never travel)


def client_init(global_params, opt_state, step0, *, tx: optax.GradientTransformation, reset_opt: bool):
    """The silo's starting state: fresh copies (the later steps donate their input buffers), with the
    learning-rate schedule at the federation's step (`at_step`)."""
    if reset_opt:
        opt_state = tx.init(global_params)
    params = jax.tree.map(jnp.copy, global_params)
    return TrainState(step=step0, params=params, opt_state=at_step(jax.tree.map(jnp.copy, opt_state), step0))


def _is_schedule(s: Any) -> bool:
    return isinstance(s, optax.ScaleByScheduleState)


def at_step(opt_state, step):
    """The optimizer state with its schedule's count set to `step` (round × H): a silo that skipped
    rounds, or resets its moments every round, continues the schedule where the federation is instead of
    restarting its warm-up. Only the schedule's count moves: Adam's own count (its bias correction)
    stays the number of steps its moments have seen."""
    return jax.tree.map(
        lambda s: s._replace(count=jnp.asarray(step, s.count.dtype)) if _is_schedule(s) else s,
        opt_state,
        is_leaf=_is_schedule,
    )


def client_final(global_params, local_params, error, *, method: str, block_size: int):
    """(payload, new error): Δ = θ_global − θ_local, compressed with error feedback."""
    return compression.compress(outer.pseudo_gradient(global_params, local_params), error, method, block_size)


def client_round(
    global_params, opt_state, error, step0, batches, *, step_fn, tx, method, block_size, reset_opt
) -> ClientOutput:
    """client_init -> H client steps -> client_final as one pure function (vmap it over silos)."""
    state = client_init(global_params, opt_state, step0, tx=tx, reset_opt=reset_opt)
    state, metrics = local_train(state, batches, step_fn=step_fn)
    payload, new_error = client_final(
        global_params, state.params, error, method=method, block_size=block_size
    )
    return ClientOutput(payload=payload, error=new_error, opt_state=state.opt_state, metrics=metrics)

"""Compressed download (`federation.download_compression`): the global model sent as a compressed delta.

The aggregator keeps the exact global θ_r and the *broadcast copy* θ̂_r that every up-to-date silo holds.
Silos train from θ̂_r (their pseudo-gradients are θ̂_r − θ_k); the outer step updates θ; then

    θ̂_{r+1} = θ̂_r + decode(compress(θ_{r+1} − θ̂_r))        (bf16 or int8, `compression`)

What one round does not send (θ_{r+1} − θ̂_{r+1}, the quantisation error) is part of the next round's
delta: error feedback on the server side, so the residual stays at one quantisation step and is never
dropped. A silo that last held θ̂_q downloads the deltas q+1..r, or the full f32 θ̂_r when that is
smaller (a silo that joins, or fell behind by more rounds than the full model costs). The traffic
ledger counts exactly that per silo. Evaluation, export and the summary use the exact θ.

"none" (the default) sends θ itself in f32, as before: no broadcast copy exists. The one-process
simulation implements it; a deployment refuses it (`deploy.check_deployable`) until the store carries
the deltas.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from fedjax_lm import compression

PyTree = Any


class Downloads:
    """The broadcast copy's update and what each silo's download costs."""

    def __init__(self, method: str, block_size: int, abstract_params: PyTree):
        if method not in compression.METHODS:
            raise ValueError(
                f"federation.download_compression must be one of {compression.METHODS}, got {method!r}"
            )
        self.method, self.block_size = method, int(block_size)
        self.full_bytes = compression.raw_nbytes(abstract_params)
        self.delta_bytes = compression.payload_nbytes(
            jax.eval_shape(
                lambda p: compression.compress(p, None, method, self.block_size)[0], abstract_params
            )
        )

        def step(broadcast, params):
            delta = jax.tree.map(lambda p, b: p - b, params, broadcast)
            payload, _ = compression.compress(delta, None, method, self.block_size)
            return jax.tree.map(lambda b, d: b + d, broadcast, compression.decompress(payload, broadcast))

        self._step = jax.jit(step)

    @property
    def on(self) -> bool:
        return self.method != "none"

    def next_broadcast(self, broadcast: PyTree, params: PyTree) -> PyTree:
        """θ̂_{r+1} from θ̂_r and the exact θ_{r+1}."""
        return self._step(broadcast, params)

    def cost(self, held: int | None, r: int) -> int:
        """Bytes silo downloads to hold θ̂_r, having held θ̂_held (None: nothing yet)."""
        if not self.on:
            return self.full_bytes
        if held is None or held > r:
            return self.full_bytes
        return min((r - held) * self.delta_bytes, self.full_bytes)

    def costs(self, held: Mapping[str, int | None], silos, r: int) -> dict[str, int]:
        return {s: self.cost(held.get(s), r) for s in silos}

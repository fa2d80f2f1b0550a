"""Validation perplexity per silo and pooled (token-weighted over silos)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_lm import data as data_lib


def eval_sets(
    corpus: "data_lib.Corpus", silos: Sequence[str], *, seq_len: int, batch_size: int, max_batches: int
):
    """Deterministic validation batches per silo (the same for every run of a config)."""
    return {
        s: data_lib.eval_batches(
            corpus, s, split="val", seq_len=seq_len, batch_size=batch_size, max_batches=max_batches
        )
        for s in silos
    }


def _ppl(loss: float) -> float:
    """exp(loss), inf rather than an OverflowError for a diverged model."""
    return math.exp(loss) if loss < 700 else math.inf


def evaluate(
    silo_runtime: Any,
    params: Any,
    sets: Mapping[str, list[Mapping[str, np.ndarray]]],
    personalised: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """{'per_silo': {silo: {loss, ppl, tokens}}, 'pooled': {loss, ppl, tokens}}; `personalised` (silo ->
    params) evaluates a silo with its own model (key layers of its federation, or its own)."""
    per = {}
    total, count = 0.0, 0.0
    for name, batches in sets.items():
        r = silo_runtime.evaluate(params if personalised is None else personalised[name], batches)
        per[name] = r
        total += r["loss"] * r["tokens"]
        count += r["tokens"]
    pooled_loss = total / count
    return {"per_silo": per, "pooled": {"loss": pooled_loss, "ppl": _ppl(pooled_loss), "tokens": count}}


def scalars(result: Mapping[str, Any]) -> dict[str, float]:
    """The metrics row of an evaluation: pooled and per-silo perplexity."""
    return {
        "pooled_ppl": result["pooled"]["ppl"],
        **{f"ppl/{k}": v["ppl"] for k, v in result["per_silo"].items()},
    }


def format_table(result: Mapping[str, Any]) -> str:
    rows = [f"{'silo':<14} {'val loss':>9} {'val ppl':>10}"]
    for name, r in result["per_silo"].items():
        rows.append(f"{name:<14} {r['loss']:>9.4f} {r['ppl']:>10.2f}")
    p = result["pooled"]
    rows.append(f"{'pooled':<14} {p['loss']:>9.4f} {p['ppl']:>10.2f}")
    return "\n".join(rows)

"""The inner (silo) optimizer: AdamW (or plain SGD) with linear warm-up, cosine decay and global-norm clipping.

SGD is there for a check more than for training: with it, H = 1, FedAvg (outer lr 1) and uncompressed
updates, a round is exactly one data-parallel SGD step on the silos' batches together (the mean of
the silos' lr·g_k is lr times the gradient of the pooled batch), which tests/test_federation.py
verifies; AdamW normalises each silo's gradient by its own moments, so it has no such identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import optax

_FIELDS = {
    "name",
    "lr",
    "warmup_steps",
    "decay_steps",
    "end_lr_ratio",
    "b1",
    "b2",
    "eps",
    "weight_decay",
    "clip_norm",
    "grad_accum",
    "schedule",
}


def default_optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="adamw",  # "adamw" | "sgd" (decoupled weight decay in both)
            lr=3e-3,
            schedule="cosine",  # "cosine" | "constant"
            warmup_steps=20,
            decay_steps=0,  # 0: the run's total number of steps
            end_lr_ratio=0.1,  # cosine decays to this fraction of the peak (Photon: 10%)
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            clip_norm=1.0,  # 0 disables clipping
            grad_accum=1,  # micro-batches per optimizer step
        )
    )


def check_config(cfg: Mapping[str, Any]) -> None:
    unknown = set(cfg) - _FIELDS
    if unknown:
        raise ValueError(f"optim config has unknown fields {sorted(unknown)}; valid: {sorted(_FIELDS)}")
    if cfg.get("name", "adamw") not in ("adamw", "sgd"):
        raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {cfg['name']!r}")
    if cfg["lr"] <= 0:
        raise ValueError(f"optim.lr must be positive, got {cfg['lr']}")
    if cfg["grad_accum"] < 1:
        raise ValueError(f"optim.grad_accum must be >= 1, got {cfg['grad_accum']}")
    if cfg["schedule"] not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {cfg['schedule']!r}")


def make_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine to `lr * end_lr_ratio` at `decay_steps` (or constant)."""
    check_config(cfg)
    warmup = int(cfg["warmup_steps"])
    if cfg["schedule"] == "constant":
        if warmup <= 0:
            return optax.constant_schedule(cfg["lr"])
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg["lr"], warmup), optax.constant_schedule(cfg["lr"])], [warmup]
        )
    decay = int(cfg["decay_steps"]) or int(total_steps)
    decay = max(decay, warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg["lr"],
        warmup_steps=warmup,
        decay_steps=decay,
        end_value=cfg["lr"] * cfg["end_lr_ratio"],
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (not norm scales)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    cfg: Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW or SGD (+ clipping) with the schedule; returns (tx, schedule) so the lr can be logged."""
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg["clip_norm"] and cfg["clip_norm"] > 0:
        parts.append(optax.clip_by_global_norm(cfg["clip_norm"]))
    if cfg.get("name", "adamw") == "sgd":  # -lr * (g + wd * p), as AdamW decouples its decay
        parts.append(optax.add_decayed_weights(cfg["weight_decay"], mask=_decay_mask))
        parts.append(optax.sgd(schedule))
        return optax.chain(*parts), schedule
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg["b1"],
            b2=cfg["b2"],
            eps=cfg["eps"],
            weight_decay=cfg["weight_decay"],
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts), schedule

"""A run's folder: its frozen config and fingerprint, and the model it produced, for any run kind.

    WORKDIR/run.json       kind, versions, the config, its fingerprint (and, for an aggregator,
                           the store it aggregates into)
    WORKDIR/checkpoints/   Orbax checkpoints with the item `params` (centralized, simulation)
    WORKDIR/summary.json   written at the end

Re-running a command on a workdir resumes it; with a different config it is refused with the
fields that differ (`--allow_config_change` to accept them). `load_params` finds the model of
a centralized run, a one-process federation or an aggregator (whose params live in the store).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from fedjax_lm import __version__

RUN_JSON = "run.json"
KINDS = ("centralized", "federated", "federated-deployment")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss; the last checkpoint is intact."""


class ConfigMismatch(ValueError):
    """A workdir or a store was started with another config."""


NOISE_SECRET = "dp_noise_secret"


def noise_secret(workdir: str) -> bytes:
    """The DP noise secret of the node that adds the noise (central DP: the aggregator), kept in its
    own workdir (mode 0600; never in the store or the config): created once, reused on resume so a
    resumed run draws the same noise."""
    from fedjax_lm import privacy

    path = os.path.join(workdir, NOISE_SECRET)
    if not os.path.exists(path):  # written whole under a temporary name, then linked: never half there
        os.makedirs(workdir, exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(privacy.new_noise_secret())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            os.unlink(tmp)
    with open(path, "rb") as f:
        return f.read()


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def config_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


def fingerprint(config: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a config (or of a part of it)."""
    blob = json.dumps(config_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted fields whose values differ, e.g. ['federation.local_steps: 32 -> 16']."""
    a, b = _flatten(config_dict(old)), _flatten(config_dict(new))
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def stored_config_diff(
    stored: Mapping[str, Any], config: ml_collections.ConfigDict | Mapping[str, Any]
) -> list[str]:
    """`config_diff` of a run.json's config (fields added since it was written at their defaults) and
    `config`: empty when resuming that run with `config` changes nothing. Where the compliance cards are
    kept and how energy is metered are left out (the gate re-reads the cards at every round); the gate's
    policy is not."""
    from fedjax_lm import config as config_lib

    local = ("federation.compliance.cards:", "federation.compliance.energy.")
    return [d for d in config_diff(config_lib.with_new_defaults(stored), config) if not d.startswith(local)]


def read_run(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, RUN_JSON)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            run = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); move it away to start a new run") from None
    if not isinstance(run, dict) or "config" not in run or run.get("kind") not in KINDS:
        raise ValueError(f"{path} is not a fedjax_lm run.json (needs 'kind' in {KINDS} and 'config')")
    return run


def open_workdir(
    workdir: str,
    config: ml_collections.ConfigDict,
    kind: str,
    *,
    allow_config_change: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Creates or re-opens a run folder: refuses another config or kind unless allowed."""
    previous = read_run(workdir)
    cfg = config_dict(config)
    if previous is not None:
        if previous["kind"] != kind:
            raise ConfigMismatch(
                f"{workdir} holds a {previous['kind']} run; this command starts a {kind} run: use another --workdir"
            )
        diff = stored_config_diff(previous["config"], cfg)
        if diff and not allow_config_change:
            raise ConfigMismatch(
                f"{workdir} was started with another config ({len(diff)} fields differ: {'; '.join(diff[:6])}"
                + (" ..." if len(diff) > 6 else "")
                + "); use another --workdir, or --allow_config_change to resume with the new values"
            )
    run = {
        "kind": kind,
        "fedjax_lm_version": __version__,
        "jax_version": jax.__version__,
        "fingerprint": fingerprint(cfg),
        "config": cfg,
        **extra,
    }
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_json_atomic(os.path.join(workdir, RUN_JSON), run)
    return run


def config_of(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was started with (for `eval --workdir W` without --config)."""
    run = read_run(workdir)
    if run is None:
        raise FileNotFoundError(f"{workdir} has no {RUN_JSON}: is it a fedjax_lm run folder?")
    from fedjax_lm import config as config_lib

    return config_lib.from_json_dict(run["config"])


def load_params(config: ml_collections.ConfigDict, workdir: str):
    """(silo runtime, params, what was loaded) of the latest model of any run kind.

    centralized / federated: the `params` item of the newest checkpoint in WORKDIR/checkpoints;
    federated-deployment (an aggregator's workdir): the newest `global/<r>` of its store.
    """
    from fedjax_lm import silo as silo_lib

    run = read_run(workdir)
    if run is None:
        raise FileNotFoundError(
            f"{workdir} has no {RUN_JSON}: give the --workdir of a `train` or `aggregate` run"
        )
    silo = silo_lib.from_config(config, total_steps=1)
    abstract = _abstract_params(silo)
    if run["kind"] == "federated-deployment":
        from fedjax_lm import store as store_lib

        store = store_lib.Store(run["store"])
        r = store.latest_global()
        if r is None:
            raise FileNotFoundError(f"the store {run['store']} of {workdir} has no published global model")
        params = store.read_global_params(r, abstract)
        store.close()
        return silo, params, f"global/{r} of {run['store']}"
    from fedjax_lm import checkpoint as ckpt_lib

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{workdir} has no checkpoints yet (no {ckpt_dir})")
    ckpt = ckpt_lib.Checkpointer(ckpt_dir)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {ckpt_dir}")
        items, meta = ckpt.restore(step, {"params": abstract})
    finally:
        ckpt.close()
    unit = "round" if run["kind"] == "federated" else "step"
    return silo, items["params"], f"{run['kind']} run, {unit} {step}"


def _abstract_params(silo):
    from fedjax_lm import sharding as sharding_lib

    return sharding_lib.with_shardings(silo.abstract_params, silo.param_shardings)

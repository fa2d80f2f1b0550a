"""Config files: Python modules with `get_config(arg) -> ml_collections.ConfigDict`.

`--config experiments/photon.py:size=tiny,silos=8` loads experiments/photon.py and calls
`get_config("size=tiny,silos=8")`; `parse_variant` turns that string into typed keywords.
"""

from __future__ import annotations

import dataclasses

import ast
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import ml_collections


def parse_variant(arg: str | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """ "a=1,b=x" -> {"a": 1, "b": "x"} over `defaults`; unknown keys are an error naming them."""
    out = dict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"config variant item {item!r} is not key=value (variant: {arg!r})")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise ValueError(f"unknown config variant key {key!r}; valid keys: {sorted(defaults)}")
        out[key] = _coerce(raw, defaults[key], key)
    return out


def _coerce(raw: str, default: Any, key: str) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"config variant {key}={raw!r}: expected a boolean")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            pass
        try:
            value = float(raw)  # allow 1e6
        except ValueError:
            value = float("nan")
        if not value.is_integer():
            raise ValueError(f"config variant {key}={raw!r}: expected an integer")
        return int(value)
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"config variant {key}={raw!r}: expected a number") from None
    try:
        value = ast.literal_eval(raw)
        return value if not isinstance(default, str) else str(value)
    except (ValueError, SyntaxError):
        return raw


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py[:variant]` the way `--config` does (for tests, notebooks and scripts)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"_fedjax_cfg_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config(arg)")
    return module.get_config(arg or None) if arg else module.get_config()


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """{"train.steps": 10} -> config.train.steps = 10, refusing keys that do not exist."""
    for dotted, value in overrides.items():
        node = config
        parts = dotted.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise KeyError(f"config has no field {dotted!r}")
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"config has no field {dotted!r}")
        node[parts[-1]] = value
    return config


def _tuples(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return tuple(_tuples(v) for v in obj)
    return obj


def from_json_dict(obj: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A config read back from JSON (run.json): lists become tuples again, so list-valued fields
    stay overridable from the command line (config_flags cannot override list fields)."""
    obj = _tuples(dict(obj))
    if isinstance(obj.get("federation"), dict):
        # Fields added since the run was written take their defaults, which keep the old behaviour.
        from fedjax_lm import federation

        obj["federation"] = _with_defaults(
            federation.default_federation_config().to_dict(), obj["federation"]
        )
    if isinstance(obj.get("optim"), dict):
        from fedjax_lm import optim

        obj["optim"] = _with_defaults(optim.default_optim_config().to_dict(), obj["optim"])
    return ml_collections.ConfigDict(obj)


def with_new_defaults(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config (run.json's, or a store's shared config) with the federation fields added since it
    was written set to their defaults: what it means to the current code. Comparing this, not the raw
    JSON, lets a run or a store written by an older version resume when only defaults were added."""
    from fedjax_lm import federation

    from fedjax_lm import optim

    out = dict(obj)
    if isinstance(out.get("federation"), dict):
        defaults = federation.default_federation_config().to_dict()
        if "deploy" not in out["federation"]:  # a store's shared config leaves each process's own out
            defaults.pop("deploy")
            defaults.pop("compliance")
        out["federation"] = _lists(_with_defaults(defaults, out["federation"]))
    if isinstance(out.get("optim"), dict):
        out["optim"] = _lists(_with_defaults(optim.default_optim_config().to_dict(), out["optim"]))
    if isinstance(out.get("model"), dict):  # presets once listed only the fields they set
        from fedjax_lm import model as model_lib

        defaults = {
            f.name: f.default
            for f in dataclasses.fields(model_lib.ModelConfig)
            if f.default is not dataclasses.MISSING
        }
        out["model"] = _lists(_with_defaults(defaults, out["model"]))
    return out


def _lists(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x


def _with_defaults(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = dict(given)
    for key, value in defaults.items():
        if key not in out:
            out[key] = _tuples(value) if isinstance(value, (list, dict)) else value
        elif isinstance(value, dict) and isinstance(out[key], dict) and key != "outer":
            out[key] = _with_defaults(value, out[key])
    return out


_SECTIONS = ("model", "data", "optim", "mesh", "sharding", "train")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks every section of a run config, before any corpus is built or downloaded.

    Raises ValueError naming the field and what is expected. `num_devices` defaults to the
    devices JAX sees (the mesh must fit them).
    """
    from fedjax_lm import model as model_lib
    from fedjax_lm import optim
    from fedjax_lm import sharding as sharding_lib

    missing = [s for s in _SECTIONS if s not in config]
    if missing:
        raise ValueError(f"the config has no section(s) {missing}; a run config needs {list(_SECTIONS)}")
    try:
        model_cfg = model_lib.ModelConfig.from_dict(config.model)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model: {e}") from None
    optim.check_config(config.optim)
    shape = dict(zip(sharding_lib.MESH_AXES, sharding_lib.mesh_shape(config.mesh, num_devices)))
    sharding_lib.normalize_rules(config.sharding.rules)
    t = config.train
    for key in ("seq_len", "batch_size", "steps", "eval_batches", "keep_checkpoints", "log_every"):
        if key in t and int(t[key]) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {t[key]}")
    for key in ("eval_every", "checkpoint_every"):
        if key in t and int(t[key]) < 0:
            raise ValueError(f"train.{key} must be >= 0 (0: off), got {t[key]}")
    if int(t.seq_len) > model_cfg.max_seq_len:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    accum = int(config.optim.grad_accum)
    if int(t.batch_size) % accum:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by optim.grad_accum={accum}")
    shards = shape["data"] * shape["fsdp"]
    if (int(t.batch_size) // accum) % shards:
        raise ValueError(
            f"train.batch_size={t.batch_size} (per micro-batch {int(t.batch_size) // accum}) does not split "
            f"over the mesh's data x fsdp = {shards} devices; change mesh or batch size"
        )
    if int(config.data.vocab_size) != model_cfg.vocab_size:
        raise ValueError(
            f"data.vocab_size={config.data.vocab_size} (the tokenizer) differs from "
            f"model.vocab_size={model_cfg.vocab_size}; set both to the same value"
        )
    if config.get("federation") is not None:
        from fedjax_lm import federation

        federation.check_config(config.federation)

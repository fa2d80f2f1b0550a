"""Config files: Python modules with `get_config(arg) -> ml_collections.ConfigDict`.

`--config experiments/photon.py:size=tiny,silos=8` loads experiments/photon.py and calls
`get_config("size=tiny,silos=8")`; `parse_variant` turns that string into typed keywords.
"""

from __future__ import annotations

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

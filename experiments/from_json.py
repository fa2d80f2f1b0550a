"""Re-run a config saved as JSON, e.g. a previous run's frozen config:

    python -m fedjax_lm train --config experiments/from_json.py:runs/photon/run.json --workdir runs/again

Accepts a run.json (the config is under "config") or a plain JSON config.
"""

import json

from fedjax_lm import config as config_lib


def get_config(path: str | None = None):
    if not path:
        raise ValueError("experiments/from_json.py needs a path: --config experiments/from_json.py:PATH.json")
    with open(path) as f:
        obj = json.load(f)
    if "config" in obj and isinstance(obj["config"], dict) and "model" in obj["config"]:
        obj = obj["config"]
    if "model" not in obj:
        raise ValueError(f"{path} holds no config (no 'model' section)")
    return config_lib.from_json_dict(obj)

"""Config files and variants, the inner optimizer schedule, and metric writing."""

import json
import math
import os

import numpy as np
import optax
import pytest

from fedjax_lm import config as config_lib
from fedjax_lm import monitor
from fedjax_lm import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_variant_types_and_errors():
    d = dict(size="tiny", steps=10, lr=1e-3, reset=False)
    v = config_lib.parse_variant("size=small,steps=1e3,lr=0.5,reset=true", d)
    assert v == dict(size="small", steps=1000, lr=0.5, reset=True)
    with pytest.raises(ValueError, match="unknown config variant key 'sizes'"):
        config_lib.parse_variant("sizes=tiny", d)
    with pytest.raises(ValueError, match="expected an integer"):
        config_lib.parse_variant("steps=1.5", d)
    with pytest.raises(ValueError, match="not key=value"):
        config_lib.parse_variant("tiny", d)


def test_centralized_config_loads_with_variant():
    c = config_lib.load_config(
        os.path.join(ROOT, "experiments/centralized.py") + ":size=tiny,steps=7,vocab=512"
    )
    assert c.train.steps == 7
    assert c.model.vocab_size == c.data.vocab_size == 512
    with pytest.raises(KeyError, match="train.stepz"):
        config_lib.apply_overrides(c, {"train.stepz": 3})
    config_lib.apply_overrides(c, {"train.steps": 3})
    assert c.train.steps == 3


def test_schedule_warmup_then_cosine_to_end_ratio():
    cfg = optim.default_optim_config()
    cfg.lr, cfg.warmup_steps, cfg.end_lr_ratio = 1.0, 10, 0.1
    s = optim.make_schedule(cfg, total_steps=110)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(s(60)), 0.1 + 0.9 * 0.5, rtol=1e-5)  # half-way down the cosine
    np.testing.assert_allclose(float(s(110)), 0.1, rtol=1e-5)


def test_optimizer_clips_and_masks_weight_decay():
    cfg = optim.default_optim_config()
    cfg.schedule, cfg.warmup_steps, cfg.lr, cfg.clip_norm, cfg.weight_decay = "constant", 0, 0.1, 1.0, 0.5
    tx, _ = optim.make_optimizer(cfg, 10)
    params = {"w": np.ones((2, 2), np.float32), "scale": np.ones((2,), np.float32)}
    zero = {"w": np.zeros((2, 2), np.float32), "scale": np.zeros((2,), np.float32)}
    updates, _ = tx.update(zero, tx.init(params), params)
    # zero gradient: only decoupled weight decay moves the matrix, never the norm scale
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["scale"], 0.0)
    huge = {"w": np.full((2, 2), 1e6, np.float32), "scale": np.full((2,), 1e6, np.float32)}
    clip = optax.clip_by_global_norm(1.0)
    clipped, _ = clip.update(huge, clip.init(params))
    assert math.isclose(float(optax.tree.norm(clipped)), 1.0, rel_tol=1e-5)
    with pytest.raises(ValueError, match="unknown fields"):
        bad = dict(optim.default_optim_config())
        bad["learning_rate"] = 1.0
        optim.make_optimizer(bad, 10)


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
    w = monitor.MetricWriter(str(tmp_path))
    w.write("train", 1, {"loss": np.float32(2.5), "lr": 0.1})
    w.write("train", 2, {"loss": 2.0})
    w.close()
    rows = monitor.read_jsonl(str(tmp_path / "metrics" / "train.jsonl"))
    assert rows == [{"step": 1, "loss": 2.5, "lr": 0.1}, {"step": 2, "loss": 2.0}]
    events = os.listdir(tmp_path / "metrics" / "tb")
    assert any(e.startswith("events.out.tfevents") for e in events)


def test_dp_allreduce_arithmetic():
    # 8 workers, 100 steps, 1 MB gradients: each sends and receives 2*7/8 MB per step.
    assert monitor.dp_allreduce_bytes(10**6, 100, 8) == 4 * 7 * 10**6 * 100
    assert monitor.dp_allreduce_bytes(10**6, 100, 1) == 0
    led = monitor.CommLedger()
    led.record_round(0, down={"a": 10, "b": 10}, up={"a": 5, "b": 5}, dp_equivalent=300)
    t = led.totals()
    assert t["bytes_moved"] == 30 and t["traffic_ratio_vs_dp"] == 10.0
    json.dumps(t)

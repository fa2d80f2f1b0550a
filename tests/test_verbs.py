"""eval, generate and export on every run kind, as a user runs them after `train`."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedjax_lm import model as model_lib
from fedjax_lm import runs
from fedjax_lm import simulation
from fedjax_lm import train
from tests.test_export import numpy_llama
from tests.test_simulation import fed_config
from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like a user
    r = subprocess.run(
        [sys.executable, "-m", "fedjax_lm", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def finished_runs(small_corpus, tmp_path_factory):
    """A centralized and a one-process federated run of the tiny test model, trained here."""
    root = tmp_path_factory.mktemp("runs")
    central = tiny_config(small_corpus)
    central.mesh.update(dict(data=1, fsdp=1, tensor=1))
    train.train(central, str(root / "central"))
    simulation.train(fed_config(small_corpus), str(root / "fed"))
    return {"centralized": str(root / "central"), "federated": str(root / "fed")}


@pytest.mark.parametrize("kind", ["centralized", "federated"])
def test_eval_generate_export_after_train(finished_runs, tmp_path, kind):
    work = finished_runs[kind]
    unit = "round 3" if kind == "federated" else "step 6"
    # eval: the config comes from the workdir's run.json; the numbers equal the run's own summary
    r = cli("eval", "--workdir", work)
    assert f"model: {kind} run, {unit}" in r.stdout
    summary = json.load(open(os.path.join(work, "summary.json")))
    pooled = float(r.stdout.split("pooled")[1].split()[0])
    assert pooled == pytest.approx(summary["val"]["pooled"]["loss"], abs=1e-4)
    # generate: the prompt continued, the same text for the same seed
    args = ("generate", "--workdir", work, "--prompt", "def main", "--max_new_tokens", "12", "--seed", "3")
    a, b = cli(*args), cli(*args)
    assert a.stdout.startswith("def main") and len(a.stdout.strip()) > len("def main")
    assert a.stdout == b.stdout and f"{kind} run" in a.stderr
    # export: the tokenizer beside the weights, logits equal to fedjax_lm's on the same tokens
    out = str(tmp_path / "hf")
    cli("export", "--workdir", work, "--out", out)
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors", "tokenizer.model"]
    assert open(os.path.join(out, "README.md")).read().startswith("---\nlicense:")  # the model card
    config = runs.config_of(work)
    silo, params, _ = runs.load_params(config, work)
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 16))
    with jax.set_mesh(silo.mesh):
        ours = np.asarray(
            jax.jit(silo._with_rules(lambda p, t: silo.model.apply({"params": p}, t)))(params, tokens),
            np.float64,
        )
    theirs = numpy_llama(out, tokens)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    assert model_lib.param_count(silo.model_config) == sum(x.size for x in jax.tree.leaves(params))


def test_load_params_refuses_a_folder_that_is_not_a_run(tmp_path, small_corpus):
    with pytest.raises(FileNotFoundError, match="has no run.json"):
        runs.load_params(fed_config(small_corpus), str(tmp_path))

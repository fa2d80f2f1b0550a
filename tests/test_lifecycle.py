"""Lifecycle monitoring: training FLOPs (formula vs XLA), energy per silo per round, the run's totals."""

import json
import time

import jax
import numpy as np
import pytest

from fedjax_lm import energy
from fedjax_lm import model as model_lib
from fedjax_lm import silo as silo_lib
from fedjax_lm import simulation
from tests.test_simulation import fed_config


def busy(seconds):
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        pass


def test_the_estimate_meter_is_time_times_power_and_says_it_is_an_estimate():
    cfg = {
        **energy.default_config(),
        "meter": "estimate",
        "device_power_w": 360.0,
        "grid_gco2_per_kwh": 400.0,
    }
    meter = energy.Meter(cfg)
    t = time.perf_counter()
    with meter.measure() as used:
        busy(0.3)
    seconds = time.perf_counter() - t
    assert used["energy_kwh"] == pytest.approx(seconds * 360.0 / 3.6e6, rel=0.05)
    assert used["co2_kg"] == pytest.approx(used["energy_kwh"] * 0.4)
    assert used["energy_source"].startswith("estimated (wall time x device_power_w=360 W)")
    with energy.Meter({**cfg, "meter": "off"}).measure() as nothing:
        busy(0.01)
    assert nothing == {}


def test_codecarbon_meters_this_machine_and_flags_an_estimate_unless_a_counter_exists():
    meter = energy.Meter(energy.default_config())
    try:
        with meter.measure() as one:
            busy(0.5)
        with meter.measure() as two:
            busy(1.5)
    finally:
        meter.close()
    assert 0 < one["energy_kwh"] < two["energy_kwh"]  # more busy time, more energy
    counter = energy._counter()
    assert one["energy_source"] == (f"measured ({counter})" if counter else meter.source)
    assert counter or one["energy_source"].startswith("estimated")
    assert one["co2_kg"] is None  # neither a country nor a grid intensity was given


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("meter", "rapl", "meter must be one of"),
        ("country_iso_code", "de", "ISO 3166 alpha-3"),
        ("grid_gco2_per_kwh", -1.0, "grid_gco2_per_kwh must be >= 0"),
    ],
)
def test_bad_energy_settings_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        energy.check_config({**energy.default_config(), field: value})
    with pytest.raises(ValueError, match="needs device_power_w > 0"):
        energy.check_config({**energy.default_config(), "meter": "estimate"})


def test_the_flop_formula_agrees_with_xla_cost_analysis(small_corpus):
    """model.flops_per_token x tokens per step against XLA's count of the compiled train step. XLA also
    counts the masked half of causal attention, softmax, norms and the optimizer, so it reads higher;
    the matmuls dominate, so the two agree within a few tens of percent. The blocks are unrolled here:
    XLA's cost analysis counts the body of a rolled loop (scan_layers) once, not once per layer."""
    config = fed_config(small_corpus)
    config.model.update(dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512, vocab_size=512))
    config.model.scan_layers = False
    s = silo_lib.from_config(config, total_steps=10)
    batch, seq = 4, 64
    _, compiled = s.compile_train_step(batch, seq)
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    formula = model_lib.flops_per_token(s.model_config, seq) * batch * seq
    assert 0.9 < xla / formula < 1.6, (xla, formula)


def test_rows_and_summary_carry_flops_seconds_and_energy_per_silo(small_corpus, tmp_path):
    config = fed_config(small_corpus, rounds=2)
    summary = simulation.train(config, str(tmp_path / "run"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics" / "rounds.jsonl")]
    fpt = model_lib.flops_per_token(
        silo_lib.from_config(config, total_steps=1).model_config, int(config.train.seq_len)
    )
    for row in rows:
        silos = row["accepted"]
        assert sum(row[f"flops/{s}"] for s in silos) == pytest.approx(row["flops"])
        assert row[f"flops/{silos[0]}"] == pytest.approx(row["tokens"] / len(silos) * fpt)
        assert all(row[f"seconds/{s}"] > 0 and row[f"energy_kwh/{s}"] > 0 for s in silos)
        assert row["energy_kwh"] == pytest.approx(sum(row[f"energy_kwh/{s}"] for s in silos))
        assert sum(row[f"bytes_up/{s}"] for s in silos) == row["bytes_up"] > 0
        assert sum(row[f"bytes_down/{s}"] for s in silos) == row["bytes_down"]  # round 0: 0 (the seed's copy)
        assert row["energy_source"]
    assert summary["energy"]["energy_kwh"] == pytest.approx(sum(r["energy_kwh"] for r in rows))
    assert summary["energy"]["rounds"] == 2
    assert summary["flops"] == pytest.approx(sum(r["flops"] for r in rows))
    assert np.isfinite(summary["flops"]) and jax.process_count() == 1


def test_report_and_export_write_the_documents_from_measured_figures(small_corpus, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    from tests.test_compliance import ROOT, write_cards

    config = fed_config(small_corpus, rounds=2)
    config.federation.compliance.cards = write_cards(tmp_path / "cards")
    config.federation.compliance.energy.grid_gco2_per_kwh = 300.0
    summary = simulation.train(config, str(tmp_path / "run"))
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")

    def verb(*args):
        r = subprocess.run(
            [sys.executable, "-m", "fedjax_lm", *args], capture_output=True, text=True, cwd=ROOT, env=env
        )
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    verb("report", "--workdir", str(tmp_path / "run"))
    reports = tmp_path / "run" / "reports"
    doc = json.loads((reports / "technical_documentation.json").read_text())
    compute = doc["2_development_process"]["d_compute"]
    assert compute["training_flop"] == pytest.approx(summary["flops"])
    assert compute["energy_kwh"] == pytest.approx(summary["energy"]["energy_kwh"])
    assert compute["co2_eq_kg"] == pytest.approx(summary["energy"]["energy_kwh"] * 0.3)
    assert doc["1_general_description"]["f_licence"] == "Apache-2.0"
    assert set(doc["2_development_process"]["c_data"]) == {"code", "lines", "prose"}
    assert doc["1_general_description"]["b_acceptable_use_policy"] == "unknown"  # never guessed
    assert (
        doc["compliance_verdict"]
        == json.loads((tmp_path / "run" / "compliance" / "verdict.json").read_text())["status"]
    )
    content = json.loads((reports / "training_content_summary.json").read_text())
    assert set(content) == {
        "template",
        "1_general_information",
        "2_list_of_data_sources",
        "3_data_processing",
    }
    assert content["1_general_information"]["training_tokens"] == summary["tokens"]
    listed = [e["silo"] for entries in content["2_list_of_data_sources"].values() for e in entries]
    assert sorted(listed) == ["code", "lines", "prose"]
    assert (
        (reports / "training_content_summary.md")
        .read_text()
        .startswith("# Public summary of training content")
    )
    verb("export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
    card = (tmp_path / "hf" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert meta["co2_eq_emissions"]["emissions"] == pytest.approx(summary["energy"]["energy_kwh"] * 300.0)
    assert "energy_source" not in meta and summary["energy"]["energy_source"] in card

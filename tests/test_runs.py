"""Run folders: the config fingerprint, refusing a changed config, one metrics row per round."""

import json

import pytest

from fedjax_lm import monitor
from fedjax_lm import runs
from fedjax_lm import simulation
from tests.test_simulation import fed_config


def test_fingerprint_and_diff_name_the_fields(small_corpus):
    a, b = fed_config(small_corpus), fed_config(small_corpus)
    assert runs.fingerprint(a) == runs.fingerprint(b)
    b.federation.local_steps = 7
    b.optim.lr = 0.5
    assert runs.fingerprint(a) != runs.fingerprint(b)
    assert runs.config_diff(a, b) == ["federation.local_steps: 3 -> 7", f"optim.lr: {a.optim.lr!r} -> 0.5"]


def test_rerunning_a_workdir_with_another_config_is_refused(small_corpus, tmp_path):
    work = str(tmp_path / "w")
    runs.open_workdir(work, fed_config(small_corpus), "federated")
    before = (tmp_path / "w" / "run.json").read_text()
    changed = fed_config(small_corpus, local_steps=4)
    with pytest.raises(runs.ConfigMismatch, match=r"federation.local_steps: 3 -> 4.*--allow_config_change"):
        simulation.train(changed, work)
    assert (tmp_path / "w" / "run.json").read_text() == before  # refused before writing anything
    assert not (tmp_path / "w" / "checkpoints").exists()
    with pytest.raises(runs.ConfigMismatch, match="holds a federated run"):
        runs.open_workdir(work, fed_config(small_corpus), "centralized")
    run = runs.open_workdir(work, changed, "federated", allow_config_change=True)
    assert json.loads((tmp_path / "w" / "run.json").read_text())["fingerprint"] == run["fingerprint"]
    assert run["fingerprint"] == runs.fingerprint(changed)


def test_a_run_written_before_fields_were_added_resumes_unless_one_really_differs(small_corpus, tmp_path):
    """An older version's run.json lacks the federation fields added since (secagg, download compression,
    adaptive clipping): at their defaults they change nothing, so the run resumes; a real change is named."""
    work = str(tmp_path / "w")
    runs.open_workdir(work, fed_config(small_corpus), "federated")
    path = tmp_path / "w" / "run.json"
    old = json.loads(path.read_text())
    del old["config"]["federation"]["secagg"], old["config"]["federation"]["download_from_seed"]
    del old["config"]["federation"]["dp"]["adaptive_clip"]
    path.write_text(json.dumps(old))
    runs.open_workdir(work, fed_config(small_corpus), "federated")  # resumes
    path.write_text(json.dumps(old))
    changed = fed_config(small_corpus)
    changed.federation.download_compression = "bf16"
    with pytest.raises(
        runs.ConfigMismatch, match=r"1 fields differ: federation.download_compression: 'int8' -> 'bf16'"
    ):
        runs.open_workdir(work, changed, "federated")
    # where the compliance cards are kept (another checkout, another machine) is not what the run is
    del old["config"]["federation"]["compliance"]
    path.write_text(json.dumps(old))
    moved = fed_config(small_corpus)
    moved.federation.compliance.cards = str(tmp_path)
    runs.open_workdir(work, moved, "federated")  # resumes


def test_a_damaged_run_json_is_named(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="run.json is not valid JSON"):
        runs.read_run(str(tmp_path))


def test_metrics_rows_stay_one_per_round_after_a_crash(tmp_path):
    w = monitor.MetricWriter(str(tmp_path), tensorboard=False)
    for r in range(3):
        w.write("rounds", r + 1, {"round": r, "tokens": 10})
    w.write("rounds", 3, {"round": 2, "tokens": 10})  # round 2 written again after a restart
    assert w.truncate("rounds", keep_below=2) == 2  # resume at round 2: its rows go
    w.write("rounds", 3, {"round": 2, "tokens": 10})
    w.close()
    rows = monitor.read_jsonl(str(tmp_path / "metrics" / "rounds.jsonl"))
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert sum(r["tokens"] for r in rows) == 30


def test_step_progress_in_a_log_file_prints_at_most_every_interval(capsys):
    p = monitor.StepProgress("quotes-en r3", total=8, tokens_per_step=100, enabled=True, log_every_s=0.0)
    for done in (2, 4, 6, 8):
        p.update(done, loss=5.0 - done / 10)
    p.close()
    lines = capsys.readouterr().err.splitlines()  # pytest's stderr is no terminal: plain lines
    assert len(lines) == 3 and lines[0].startswith("quotes-en r3: step 2/8 loss 4.800,")
    assert "tokens/s, round ETA" in lines[-1]
    quiet = monitor.StepProgress("s", total=8, tokens_per_step=1, enabled=True, log_every_s=3600.0)
    quiet.update(4, loss=1.0)
    assert capsys.readouterr().err == ""  # a short round prints nothing


@pytest.mark.parametrize("field", ["parallel", "aggregate_inner_moments"])
def test_a_deployment_refuses_simulation_only_options(small_corpus, field):
    from fedjax_lm import deploy

    c = fed_config(small_corpus, **{field: True})
    with pytest.raises(ValueError, match=f"federation.{field}"):
        deploy.check_deployable(c)
    deploy.check_deployable(fed_config(small_corpus))  # the default config deploys


def test_a_store_written_before_fields_were_added_accepts_the_same_federation(small_corpus, tmp_path):
    from fedjax_lm import store as store_lib
    from fedjax_lm.deploy import common

    config = fed_config(small_corpus)
    shared = common.shared_config(config)
    del shared["federation"]["secagg"], shared["federation"]["dp"]["adaptive_clip"]
    store = store_lib.Store(str(tmp_path / "store"))
    store.write_run({"shared_config": shared, "fingerprint": runs.fingerprint(shared)})
    common.check_store_run(store, config, "silo a")  # only defaults were added: the same federation
    config.federation.secagg.update(dict(enabled=True, bound=0.1))
    config.federation.update(dict(compression="none", max_update_norm_ratio=0.0))
    with pytest.raises(runs.ConfigMismatch, match="federation.secagg.enabled: False -> True"):
        common.check_store_run(store, config, "silo a")

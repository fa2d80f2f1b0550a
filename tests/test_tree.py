"""The tree of federations (fedjax_lm/tree.py) in the one-process driver: the flat federation as the depth-1
tree, sub-federations as participants, key layers kept local (FedPer, WorldLM), resume of a three-level tree."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lm import compression
from fedjax_lm import config as config_lib
from fedjax_lm import simulation
from fedjax_lm import tree as tree_lib
from fedjax_lm import tree_report
from fedjax_lm import worldlm
from test_simulation import fed_config, leaves

pytestmark = pytest.mark.slow

THREE_LEVELS = "west(text(code,prose)),east(jl(lines))"
KEYS = ("lm_head/.*", "final_norm/.*")


def tree_config(small_corpus, spec="", **tree):
    c = fed_config(small_corpus, download_compression="none")
    c.federation.compliance.cards = ""
    c.federation.tree.spec = spec
    c.federation.tree.update(tree)
    return c


def rows(workdir):
    return [json.loads(line) for line in open(workdir / "metrics" / "rounds.jsonl")]


def test_spec_parses_and_bad_specs_name_the_problem():
    t = tree_lib.parse(THREE_LEVELS, ["code", "prose", "lines"], local_rounds=2)
    assert t.root.children == ("west", "east")
    assert t.nodes["text"].children == ("code", "prose") and t.parent["lines"] == "jl"
    assert t.path("prose") == ["root", "west", "text"] and t.depth() == 3
    assert t.leaf_rounds() == 4 and t.silos_under("west") == ["code", "prose"]
    assert t.inner() == ["west", "east", "text", "jl"]
    flat = tree_lib.parse("", ["b", "a"])
    assert flat.flat and flat.root.children == ("a", "b") and flat.leaf_rounds() == 1
    silos = ["code", "prose", "lines"]
    for spec, message in [
        ("a(code,prose),lines,zz", "does not have: \\['zz'\\]"),
        ("a(code),lines", "leaves out silos \\['prose'\\]"),
        ("a(code,prose),a(lines)", "'a' is used twice"),
        ("a(code,prose,lines", "not closed"),
        ("a(code;prose),lines", "unexpected ';'"),
        ("root(code,prose,lines)", "reserved"),
    ]:
        with pytest.raises(ValueError, match=message):
            tree_lib.parse(spec, silos)
    with pytest.raises(ValueError, match="different numbers of rounds"):
        tree_lib.parse("a(b(code),prose),lines", silos, local_rounds=2)
    tree_lib.parse("a(b(code),prose),lines", silos, local_rounds=1)  # equal at local_rounds=1


def test_config_errors_name_the_field(small_corpus):
    c = tree_config(small_corpus, THREE_LEVELS)
    c.federation.download_compression = "int8"
    with pytest.raises(ValueError, match="does not support federation.download_compression"):
        config_lib.validate(c)
    c = tree_config(small_corpus, key_layers=("no_such_layer",))
    with pytest.raises(ValueError, match="'no_such_layer' matches no parameter"):
        simulation.Simulation(c, simulation.select.ensure_corpus(c.data), progress=False)
    c = tree_config(small_corpus, key_owner="everyone")
    with pytest.raises(ValueError, match="key_owner must be one of"):
        config_lib.validate(c)
    c = tree_config(small_corpus, "a(code,prose),lines")
    c.federation.dp.update(dict(mode="central", clip_norm=1.0, noise_multiplier=1.0))
    with pytest.raises(ValueError, match=r"federation 'root' has both silos \(\['lines'\]\) and federations"):
        simulation.Simulation(c, simulation.select.ensure_corpus(c.data), progress=False)
    c.federation.tree.spec = "a(code,prose),b(lines)"
    c.federation.dp.epsilon_budget = 5.0
    with pytest.raises(ValueError, match="does not support federation.dp.epsilon_budget"):
        config_lib.validate(c)


def test_dp_in_a_tree_is_accounted_per_silo_round_at_every_node(small_corpus):
    """Every node of a DP tree accounts a silo's rounds (root rounds x leaf rounds, q = 1) and finds the
    same sigma for a target epsilon; only the federations of silos clip and add noise; with attention over
    key layers each of the round's two queries is drawn with sigma x sqrt(2)."""
    from fedjax_lm import accounting
    from fedjax_lm import federation

    c = tree_config(small_corpus, THREE_LEVELS, local_rounds=2, key_layers=KEYS, residual=False)
    c.federation.dp.update(dict(mode="central", clip_norm=1.0, target_epsilon=8.0))
    root = federation.Federation(c, ["code", "prose", "lines"])
    west = federation.Federation(tree_lib.node_config(c, "west"), ["code", "prose"])
    text = federation.Federation(tree_lib.node_config(c, "text"), ["code", "prose"])
    sigma = accounting.noise_multiplier_for(8.0, 1e-5, 3 * 4, accountant="rdp", sampling_probability=1.0)
    for f in (root, west, text):
        assert f.dp_round.rounds == 12 and f.dp_round.noise_multiplier == pytest.approx(sigma)
        assert f.dp_round.update_noise_multiplier == pytest.approx(sigma * np.sqrt(2))
    assert [f.dp_here for f in (root, west, text)] == [False, False, True]
    assert not root.central_noise and text.central_noise
    assert text.dp_round.noise_std(1.0) == pytest.approx(sigma * np.sqrt(2) / 2)  # D = its 2 silos
    assert root.privacy_summary(3, 1.0)["epsilon"] == pytest.approx(8.0, rel=1e-3)


def test_dp_noise_is_added_once_at_the_federations_of_silos(small_corpus, tmp_path):
    """One root round of a two-level tree with FedAvg everywhere, C above every norm: the DP run's params
    differ from the same run without DP by the root's token-weighted mean of its federations' noise,
    std sqrt((2/3)^2 (sigma C / 2)^2 + (1/3)^2 (sigma C)^2) = 0.471 sigma C (t has 2 silos, j 1). Noise
    at the root as well would give 0.687 sigma C; none in the federations 0.5 sigma C."""
    from fedjax_lm import outer

    def config(dp: bool):
        c = tree_config(small_corpus, "t(code,prose),j(lines)")
        c.federation.update(dict(rounds=1, compression="none"))
        c.federation.outer = outer.default_outer_config("fedavg")
        if dp:
            c.federation.dp.update(dict(mode="central", clip_norm=1e3, noise_multiplier=1e-5))
        return c

    plain = simulation.train(config(False), str(tmp_path / "plain"))
    private = simulation.train(config(True), str(tmp_path / "private"))
    diff = np.concatenate(
        [(a - b).ravel() for a, b in zip(leaves(private["server"].params), leaves(plain["server"].params))]
    )
    assert diff.size > 40_000
    np.testing.assert_allclose(diff.std(), 0.4714 * 1e-5 * 1e3, rtol=0.02)
    assert abs(diff.mean()) < 5 * diff.std() / np.sqrt(diff.size)
    row = rows(tmp_path / "private")[0]
    assert row["clipped/t"] == 0 and row["clipped/j"] == 0 and "dp_epsilon" in row
    assert private["privacy"]["rounds"] == 1 and private["privacy"]["sampling_probability"] == 1.0


def test_dp_by_federation_noises_once_at_the_root(small_corpus, tmp_path):
    """dp.unit='federation': the root clips and noises its federations' uploads (weight 1 each, D = 2),
    the federations add nothing and account nothing. Two runs that differ only in sigma differ by that
    noise alone: std (sigma_1 - sigma_2) C / 2 (with noise in the federations too it would be larger)."""
    from fedjax_lm import federation
    from fedjax_lm import outer

    def config(sigma: float):
        c = tree_config(small_corpus, "t(code,prose),j(lines)")
        c.federation.update(dict(rounds=1, compression="none"))
        c.federation.outer = outer.default_outer_config("fedavg")
        c.federation.dp.update(dict(mode="central", clip_norm=1e3, noise_multiplier=sigma, unit="federation"))
        return c

    root = federation.Federation(config(1e-5), ["code", "prose", "lines"])
    t = federation.Federation(tree_lib.node_config(config(1e-5), "t"), ["code", "prose"])
    assert root.dp_here and root.dp_round.rounds == 1 and not t.dp_on and not t.dp_here
    quiet = simulation.train(config(1e-9), str(tmp_path / "quiet"))
    loud = simulation.train(config(1e-5), str(tmp_path / "loud"))
    diff = np.concatenate(
        [(a - b).ravel() for a, b in zip(leaves(loud["server"].params), leaves(quiet["server"].params))]
    )
    np.testing.assert_allclose(diff.std(), (1e-5 - 1e-9) * 1e3 / 2, rtol=0.02)
    assert loud["privacy"]["unit"] == "federation" and loud["privacy"]["rounds"] == 1
    assert "clipped/t" not in rows(tmp_path / "loud")[0]


def test_private_key_aggregate_stays_in_the_clip_ball_and_is_noised(small_corpus):
    """WorldLM's key layers under DP: each silo's clipped key deltas, leaf by leaf inside C_l; their
    attention mean inside C's ball whatever the weights (one silo moves it by at most 2C); the federation
    adds N(0, (eta 2 sigma sqrt(2) C)^2) per coordinate to it."""
    from fedjax_lm import federation

    rng = np.random.default_rng(0)
    shapes = {"lm_head/kernel": (32, 64), "final_norm/scale": (32,)}
    sent = {n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in shapes.items()}
    raw = [
        {n: jnp.asarray(rng.normal(size=s) * 10.0**k, jnp.float32) for n, s in shapes.items()}
        for k in range(3)
    ]
    norms = [float(np.sqrt(sum(np.sum(np.square(x)) for x in d.values()))) * 1.5 for d in raw]
    C = 2.0
    clipped = [worldlm.private_key_deltas(d, min(1.0, C / n), C) for d, n in zip(raw, norms)]
    for d in clipped:
        for n, x in d.items():
            assert float(jnp.linalg.norm(x)) <= C * np.sqrt(x.size / (32 * 64 + 32)) * (1 + 1e-5)
    for T in (1e-3, 0.1, 10.0):
        new, _, _ = worldlm.aggregate_keys(sent, clipped, [1.0] * 3, attention=True, temperature=T, step=1.0)
        m = np.concatenate([np.ravel(sent[n] - new[n]) for n in sent])
        assert np.linalg.norm(m) <= C * (1 + 1e-5)
        alone = [clipped[0], {n: jnp.zeros_like(x) for n, x in clipped[1].items()}, clipped[2]]
        moved, _, _ = worldlm.aggregate_keys(sent, alone, [1.0] * 3, attention=True, temperature=T, step=1.0)
        assert np.linalg.norm(np.concatenate([np.ravel(new[n] - moved[n]) for n in sent])) <= 2 * C * (
            1 + 1e-5
        )

    c = tree_config(small_corpus, key_layers=KEYS, step=0.5)
    c.federation.dp.update(dict(mode="central", clip_norm=C, noise_multiplier=0.3))
    f = federation.Federation(c, ["code", "prose", "lines"])
    keys = worldlm.key_layers(f.init_server(0).params, f.key_mask)
    zero = [{n: jnp.zeros_like(x) for n, x in keys.items()}] * 3
    new, _, _ = f.aggregate_keys(keys, zero, [1.0] * 3, [0.0] * 3, 0, b"k" * 32)
    noise = np.concatenate([np.ravel(new[n] - keys[n]) for n in keys])
    np.testing.assert_allclose(noise.std(), 0.5 * 2 * 0.3 * np.sqrt(2) * C, rtol=0.03)
    again, _, _ = f.aggregate_keys(keys, zero, [1.0] * 3, [0.0] * 3, 0, b"k" * 32)
    assert all(np.array_equal(again[n], new[n]) for n in keys)  # the same key: the same noise on resume
    c.federation.tree.attention = False
    assert (
        federation.Federation(c, ["code", "prose", "lines"]).aggregate_keys(
            keys, zero, [1.0] * 3, [0.0] * 3, 0, b"k" * 32
        )
        is None
    )  # the key leaves of the noised mean are the release


def test_depth_one_tree_is_the_flat_federation_bit_for_bit(small_corpus, tmp_path):
    flat = simulation.train(tree_config(small_corpus), str(tmp_path / "flat"))
    spelled = simulation.train(tree_config(small_corpus, "lines,prose,code"), str(tmp_path / "spelled"))
    for x, y in zip(leaves(flat["server"].params), leaves(spelled["server"].params)):
        np.testing.assert_array_equal(x, y)
    assert [r["tokens"] for r in rows(tmp_path / "flat")] == [r["tokens"] for r in rows(tmp_path / "spelled")]
    assert flat["communication"] == spelled["communication"]


@pytest.mark.parametrize("spec", ["a(code),b(lines),c(prose)", "a(code,prose),b(lines)"])
def test_fedavg_sub_federations_match_the_flat_federation(small_corpus, tmp_path, spec):
    """Sub-federations with FedAvg (lr 1) and uncompressed uploads pass on the token-weighted mean of their
    silos' pseudo-gradients, weighted by their silos' tokens at the root: up to float rounding, the tree's
    round is the flat round (a sub-federation of two silos weighs twice one of one)."""
    flat = tree_config(small_corpus)
    flat.federation.compression = "none"
    nested = tree_config(small_corpus, spec)
    nested.federation.compression = "none"
    x = simulation.train(flat, str(tmp_path / "flat"))
    y = simulation.train(nested, str(tmp_path / "nested"))
    for a, b in zip(leaves(x["server"].params), leaves(y["server"].params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)
    r = rows(tmp_path / "nested")[0]
    assert r["tokens"] == rows(tmp_path / "flat")[0]["tokens"]
    np.testing.assert_allclose(r["delta_norm"], rows(tmp_path / "flat")[0]["delta_norm"], rtol=1e-5)
    assert r["inner_bytes_up"] > 0 and r["inner_bytes_down"] > 0


def test_three_level_tree_resumes_to_the_uninterrupted_result(small_corpus, tmp_path):
    c = tree_config(small_corpus, THREE_LEVELS, local_rounds=2, key_layers=KEYS)
    whole = simulation.train(c, str(tmp_path / "whole"))
    cut = tree_config(small_corpus, THREE_LEVELS, local_rounds=2, key_layers=KEYS)
    assert simulation.train(cut, str(tmp_path / "cut"), stop_after_round=1)["stopped_at_round"] == 1
    resumed = simulation.train(cut, str(tmp_path / "cut"))
    for a, b in zip(leaves(whole["server"].params), leaves(resumed["server"].params)):
        np.testing.assert_array_equal(a, b)
    assert whole["val"] == resumed["val"]  # personalised: the federations' own key layers, restored too
    row = rows(tmp_path / "whole")[-1]
    for node, kids in {
        "root": ("east", "west"),
        "west": ("text",),
        "text": ("code", "prose"),
        "jl": ("lines",),
    }.items():
        weights = [row[f"attention/{node}/{k}"] for k in kids]
        np.testing.assert_allclose(sum(weights), 1.0, rtol=1e-5)
    # every silo trained rounds x 2 x 2 rounds of H steps: the tokens of the flat run x 4
    per_round = 3 * 4 * 32  # H x batch x seq_len
    assert [r["tokens"] for r in rows(tmp_path / "whole")] == [3 * 4 * per_round] * 3
    assert whole["val"] != whole["val_global"]  # the federations' key layers differ from the root's
    series = tree_report.attention_series(str(tmp_path / "whole"))
    assert set(series) == {"root", "west", "east", "text", "jl"} and len(series["root"]["west"]) == 3
    assert tree_report.plot(str(tmp_path / "whole"), str(tmp_path / "a.png")) == str(tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0 and "| text | prose |" in tree_report.table(
        str(tmp_path / "whole")
    )


def test_key_layers_never_leave_their_federation_without_residuals(small_corpus, tmp_path):
    """WorldLM with residual=False: a federation's upload to its parent carries exactly zero key-layer
    delta, and the ledger counts none of those bytes; silos do send theirs to their own federation."""
    c = tree_config(small_corpus, "t(code,prose),j(lines)", key_layers=KEYS, residual=False)
    sim = simulation.Simulation(c, simulation.select.ensure_corpus(c.data), progress=False)
    server, privates = sim.init(0)
    outs = sim.run_clients(server.params, privates, ["j", "t"], 0)
    f = sim.fed
    for name in ("j", "t"):
        delta = compression.decompress(outs[name].payload, f.abstract_params)
        keys = worldlm.key_layers(delta, f.key_mask)
        assert keys and all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in keys.values())
        backbone = [x for x, m in zip(jax.tree.leaves(delta), jax.tree.leaves(f.key_mask)) if not m]
        assert any(float(np.abs(np.asarray(x)).max()) > 0 for x in backbone)
    assert f.key_payload_bytes > 0
    assert sim.subtree.up_bytes("t") == f.payload_bytes - f.key_payload_bytes
    assert sim.subtree.up_bytes("code") == f.payload_bytes  # a silo's key layers go to its federation
    out = simulation.train(c, str(tmp_path / "w"))
    row = rows(tmp_path / "w")[0]
    assert row["key_bytes_up/t"] == 0 and row["key_bytes_up/j"] == 0
    assert row["key_bytes_up/t/code"] == f.key_payload_bytes
    assert row["bytes_up/t"] == f.payload_bytes - f.key_payload_bytes
    assert out["communication"]["bytes_up"] == sum(
        r["bytes_up"] + r.get("inner_bytes_up", 0) for r in rows(tmp_path / "w")
    )


def test_fedper_keeps_each_silos_key_layers_at_home(small_corpus, tmp_path):
    c = tree_config(small_corpus, key_layers=("lm_head/.*",), key_owner="silo")
    sim = simulation.Simulation(c, simulation.select.ensure_corpus(c.data), progress=False)
    server, privates = sim.init(0)
    outs = sim.run_clients(server.params, privates, ["code", "lines"], 0)
    f = sim.fed
    head = worldlm.key_layers(compression.decompress(outs["code"].payload, f.abstract_params), f.key_mask)
    assert all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in head.values())
    sim._advance(privates, outs, ["code", "lines"])
    code, lines = privates["code"].arrays["keys"][0], privates["lines"].arrays["keys"][0]
    start = sim.subtree.keys_list(server.params)[0]
    assert not np.array_equal(np.asarray(code), np.asarray(start))  # trained at home
    assert not np.array_equal(np.asarray(code), np.asarray(lines))  # and its own
    np.testing.assert_array_equal(np.asarray(privates["prose"].arrays["keys"][0]), np.asarray(start))
    out = simulation.train(c, str(tmp_path / "w"))
    row = rows(tmp_path / "w")[0]
    assert row["key_bytes_up/code"] == 0 and row["bytes_up/code"] == f.payload_bytes - f.key_payload_bytes
    assert row["bytes_down/code"] == f.param_bytes - f.key_param_bytes > 0
    assert (
        out["val"]["pooled"]["ppl"] < out["val_global"]["pooled"]["ppl"]
    )  # the global head was never trained


def test_local_only_is_every_layer_kept_at_home_and_moves_nothing(small_corpus, tmp_path):
    c = tree_config(small_corpus, key_layers=(".*",), key_owner="silo")
    out = simulation.train(c, str(tmp_path / "w"))
    assert out["communication"]["bytes_moved"] == 0
    assert out["val"]["pooled"]["ppl"] < out["val_global"]["pooled"]["ppl"]  # the global model never trained


def test_worldlm_dp_sweeps_build_the_documented_points():
    """The README's DP evidence commands: every point builds and validates, with the DP settings asked for."""
    from fedjax_lm import sweep

    for spec, name, units in [
        ("experiments/worldlm.py:size=tiny,tree=family,dp=1000", "methods_dp", ["silo"] * 6),
        (
            "experiments/worldlm.py:size=tiny,tree=family,dp=1000,unit=federation",
            "tree_methods_dp",
            ["federation"] * 3,
        ),
        (
            "experiments/worldlm.py:size=tiny,tree=family,dp=1000,clip=1",
            "dp_stability",
            ["silo", "silo", "federation", "federation"],
        ),
    ]:
        points = sweep.build(spec, name, config_lib.load_config(spec))
        assert [p.config.federation.dp.unit for p in points] == units
        for p in points:
            dp = p.config.federation.dp
            assert dp.mode == "central" and dp.target_epsilon == 1000
            assert dp.clip_norm == (1.0 if "clip=1" in spec else 10.0)
    with pytest.raises(ValueError, match="needs a target epsilon"):
        sweep.build(
            "experiments/worldlm.py:size=tiny",
            "methods_dp",
            config_lib.load_config("experiments/worldlm.py:size=tiny"),
        )

"""fedjax_lm.store: real on-disk (and memory://) stores under tmp_path, no mocks."""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore as ts
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_lm import compression, outer
from fedjax_lm.store import LockHeld, LockLost, Store, UpdateRejected, stream_weighted_mean
from fedjax_lm.store import arrays as arrays_lib
from fedjax_lm.store import lock as lock_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("none", "bf16", "int8")


def make_params(seed: int = 0, embed_cols: int = 5):
    """Leaves with int8 padding (1500 = 5*256 + 220), a leaf smaller than a block, a scalar, a list."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return {
        "embed": f(300, embed_cols),
        "blocks": [{"w": f(16, 32)}, {"w": f(16, 32)}],
        "norm": f(7),
        "bias": jnp.asarray(rng.normal(), jnp.float32),
    }


def payload_for(delta, method):
    return compression.compress(delta, method=method)[0]


def template(params, method):
    return jax.eval_shape(lambda p: compression.compress(p, method=method)[0], params)


def leaves_bytes(tree):
    return [np.asarray(x).reshape(-1).view(np.uint8) for x in jax.tree.leaves(tree)]


def update_folder(store, round, silo):
    return os.path.join(store.root, "updates", str(round), silo)


def chunk_files(store, round, silo, array_path):
    base = os.path.join(update_folder(store, round, silo), *array_path.split("/"), "c")
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(base) for f in fs)


def validate(store, silo="s1", round=1, params=None, method="int8", **kw):
    params = make_params() if params is None else params
    kw.setdefault("expected_silos", [silo])
    if "closed_rounds" not in kw:
        kw.setdefault("current_round", round)
    return store.validate_update(round, silo, template(params, method), like_params=params, **kw)


def expect_rejection(fn, silo, round, *words):
    with pytest.raises(UpdateRejected) as info:
        fn()
    e = info.value
    assert (e.silo, e.round) == (silo, round)
    msg = str(e)
    assert repr(silo) in msg and f"round {round}" in msg and e.reason in msg
    for w in words:
        assert w in e.reason, e.reason
    return e


# ------------------------------------------------------------------------ updates


@pytest.mark.parametrize("method", METHODS)
def test_payload_round_trip_is_bit_exact_with_full_manifest(tmp_path, method):
    store = Store(tmp_path / "run")
    delta = make_params(1)
    payload = payload_for(delta, method)
    written = store.write_update(
        3, "siloA", payload, {"tokens": 1234, "loss": 2.5, "flops": 1e12, "energy_j": 7.0}
    )

    got = store.read_update(3, "siloA", template(delta, method))
    for a, b in zip(leaves_bytes(payload), leaves_bytes(got)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(got) == jax.tree.structure(payload)

    m = store.read_manifest(3, "siloA")
    assert m == written
    assert (m["round"], m["silo"], m["method"], m["tokens"], m["loss"], m["flops"], m["energy_j"]) == (
        3,
        "siloA",
        method,
        1234,
        2.5,
        1e12,
        7.0,
    )
    assert m["bytes"] == compression.payload_nbytes(payload)
    flat = jax.tree_util.tree_flatten_with_path(payload)[0]
    assert [a["keypath"] for a in m["arrays"]] == [arrays_lib.keypath_str(p) for p, _ in flat]
    for a, (_, x) in zip(m["arrays"], flat):
        x = np.asarray(x)
        assert a["shape"] == list(x.shape) and a["dtype"] == x.dtype.name
        assert a["sha256"] == hashlib.sha256(x.tobytes()).hexdigest()
    assert store.committed_silos(3) == ["siloA"]
    assert store.committed_silos(3, candidates=["siloA", "siloB"]) == ["siloA"]
    # ...and it validates, with the decoded norm.
    v = validate(store, "siloA", 3, delta, method)
    decoded = compression.decompress(payload, delta)
    assert v["validation"]["norm"] == pytest.approx(float(optax.tree.norm(decoded)), rel=1e-5)


def test_uncommitted_update_is_invisible(tmp_path):
    store = Store(tmp_path)
    delta = make_params(1)
    store.write_update(1, "s1", payload_for(delta, "int8"), {"tokens": 10})
    os.remove(os.path.join(store.root, "updates", "1", "s1.COMMITTED"))  # crash before the marker
    assert store.committed_silos(1) == []
    assert store.committed_silos(1, candidates=["s1"]) == []
    assert not store.is_committed(1, "s1")
    with pytest.raises(FileNotFoundError, match="not committed"):
        store.read_manifest(1, "s1")
    expect_rejection(lambda: validate(store, "s1", 1, delta), "s1", 1, "not committed")
    with pytest.raises(UpdateRejected, match="not committed"):
        stream_weighted_mean(store, 1, {"s1": 10.0}, delta)


def test_rewrite_after_crash_replaces_partial_folder(tmp_path):
    store = Store(tmp_path)
    first, second = make_params(1), make_params(2)
    store.write_update(1, "s1", payload_for(first, "int8"), {"tokens": 10})
    # Crash state: no marker, no manifest, a truncated chunk and a stray file from the attempt.
    folder = update_folder(store, 1, "s1")
    os.remove(folder + ".COMMITTED")
    os.remove(os.path.join(folder, "manifest.json"))
    victim = chunk_files(store, 1, "s1", "embed/q")[0]
    with open(victim, "r+b") as f:
        f.truncate(3)
    stray = os.path.join(folder, "embed", "stray.bin")
    open(stray, "wb").write(b"junk")

    payload = payload_for(second, "int8")
    store.write_update(1, "s1", payload, {"tokens": 20})
    assert store.committed_silos(1) == ["s1"]
    assert not os.path.exists(stray)
    got = store.read_update(1, "s1", template(second, "int8"))
    for a, b in zip(leaves_bytes(payload), leaves_bytes(got)):
        np.testing.assert_array_equal(a, b)
    assert validate(store, "s1", 1, second)["tokens"] == 20


def test_committed_update_is_not_rewritten(tmp_path):
    store = Store(tmp_path)
    first = payload_for(make_params(1), "int8")
    m1 = store.write_update(1, "s1", first, {"tokens": 10})
    folder = update_folder(store, 1, "s1")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs) + [folder + ".COMMITTED"]
    stamps = {p: os.stat(p).st_mtime_ns for p in files}
    time.sleep(0.01)
    m2 = store.write_update(1, "s1", payload_for(make_params(2), "int8"), {"tokens": 99})
    assert m2 == m1 and m2["tokens"] == 10
    assert {p: os.stat(p).st_mtime_ns for p in files} == stamps
    got = store.read_update(1, "s1", template(make_params(), "int8"))
    for a, b in zip(leaves_bytes(first), leaves_bytes(got)):
        np.testing.assert_array_equal(a, b)


def test_write_update_rejects_bad_manifest_fields(tmp_path):
    store = Store(tmp_path)
    payload = payload_for(make_params(1), "int8")
    with pytest.raises(ValueError, match="tokens"):
        store.write_update(1, "s1", payload, {"loss": 1.0})
    with pytest.raises(ValueError, match="method"):
        store.write_update(1, "s1", payload, {"tokens": 1, "method": "none"})
    with pytest.raises(ValueError, match="silo name"):
        store.write_update(1, "../evil", payload, {"tokens": 1})
    assert store.committed_silos(1) == []


# ------------------------------------------------------------------------ rejections


@pytest.fixture
def committed(tmp_path):
    store = Store(tmp_path)
    delta = make_params(1)
    store.write_update(1, "s1", payload_for(delta, "int8"), {"tokens": 10})
    return store, delta


def test_reject_truncated_chunk(committed):
    store, delta = committed
    victim = max(chunk_files(store, 1, "s1", "embed/q"), key=os.path.getsize)
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    expect_rejection(
        lambda: validate(store, "s1", 1, delta),
        "s1",
        1,
        "'embed/q'",
        "cannot be read or decoded",
        "Truncated",
    )


def test_reject_missing_chunk(committed):
    """zarr reads a missing chunk as fill values: only the checksum notices."""
    store, delta = committed
    os.remove(chunk_files(store, 1, "s1", "embed/scale")[0])
    expect_rejection(lambda: validate(store, "s1", 1, delta), "s1", 1, "'embed/scale'", "sha256")


def test_reject_corrupted_chunk_by_checksum(tmp_path):
    store = Store(tmp_path, codec="none")  # raw chunks: a flipped byte still decodes
    delta = make_params(1)
    store.write_update(1, "s1", payload_for(delta, "int8"), {"tokens": 10})
    victim = chunk_files(store, 1, "s1", "blocks/1/w/q")[0]
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(victim, "wb").write(bytes(data))
    expect_rejection(
        lambda: validate(store, "s1", 1, delta),
        "s1",
        1,
        "'blocks/1/w/q'",
        "sha256 of the stored data does not match",
    )


def _rewrite_manifest(store, round, silo, edit, fix_marker=True):
    folder = update_folder(store, round, silo)
    m = json.load(open(os.path.join(folder, "manifest.json")))
    edit(m)
    data = json.dumps(m).encode()
    open(os.path.join(folder, "manifest.json"), "wb").write(data)
    if fix_marker:  # a silo that committed wrong checksums (the marker matches its manifest)
        open(folder + ".COMMITTED", "w").write(
            json.dumps({"manifest_sha256": hashlib.sha256(data).hexdigest()})
        )


def test_reject_manifest_sha256_mismatch(committed):
    store, delta = committed

    def wrong_sha(m):
        a = next(a for a in m["arrays"] if a["keypath"] == "norm/scale")
        a["regions"][0]["sha256"] = a["sha256"] = "0" * 64

    _rewrite_manifest(store, 1, "s1", wrong_sha)
    expect_rejection(lambda: validate(store, "s1", 1, delta), "s1", 1, "'norm/scale'", "sha256")


def test_reject_manifest_changed_after_commit(committed):
    store, delta = committed
    _rewrite_manifest(store, 1, "s1", lambda m: m.update(tokens=10**9), fix_marker=False)
    expect_rejection(lambda: validate(store, "s1", 1, delta), "s1", 1, "COMMITTED marker")


def test_reject_unparseable_manifest(committed):
    store, delta = committed
    folder = update_folder(store, 1, "s1")
    data = b'{"round": 1, "silo": '
    open(os.path.join(folder, "manifest.json"), "wb").write(data)
    open(folder + ".COMMITTED", "w").write(json.dumps({"manifest_sha256": hashlib.sha256(data).hexdigest()}))
    expect_rejection(lambda: validate(store, "s1", 1, delta), "s1", 1, "does not parse")


@pytest.mark.parametrize("method", ["none", "bf16", "int8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_reject_non_finite_values(tmp_path, method, bad):
    store = Store(tmp_path)
    delta = make_params(1)
    delta["blocks"][0]["w"] = delta["blocks"][0]["w"].at[3, 4].set(bad)
    store.write_update(1, "s1", payload_for(delta, method), {"tokens": 10})
    e = expect_rejection(lambda: validate(store, "s1", 1, delta, method), "s1", 1, "blocks/0/w")
    assert "non-finite" in e.reason or "overflows" in e.reason


def test_reject_wrong_shape(committed):
    store, _ = committed
    other = make_params(1, embed_cols=6)
    expect_rejection(lambda: validate(store, "s1", 1, other), "s1", 1, "'embed/q'", "shape")


def test_reject_wrong_method(committed):
    store, delta = committed
    expect_rejection(lambda: validate(store, "s1", 1, delta, "none"), "s1", 1, "missing")


def test_reject_unknown_silo(committed):
    store, delta = committed
    expect_rejection(
        lambda: validate(store, "s1", 1, delta, expected_silos=["s2", "s3"]), "s1", 1, "unknown silo"
    )


def test_reject_closed_round(committed):
    store, delta = committed
    expect_rejection(lambda: validate(store, "s1", 1, delta, closed_rounds={0, 1}), "s1", 1, "closed")
    expect_rejection(
        lambda: validate(store, "s1", 1, delta, current_round=2), "s1", 1, "closed", "current round 2"
    )


def test_reject_norm_bound_and_accept_within(committed):
    store, delta = committed
    norm = validate(store, "s1", 1, delta)["validation"]["norm"]
    assert validate(store, "s1", 1, delta, max_norm=norm * 1.001)["silo"] == "s1"
    expect_rejection(lambda: validate(store, "s1", 1, delta, max_norm=norm / 2), "s1", 1, "exceeds the bound")


# ------------------------------------------------------------------------ aggregation


def in_memory_mean(payloads, tokens, like):
    """The simulation's aggregation: the same running mean, in memory."""
    return outer.mean_of_payloads(like, zip(payloads, tokens))[0]


@pytest.mark.parametrize("methods", [("int8",) * 5, ("none", "bf16", "int8", "int8", "none")])
def test_stream_weighted_mean_matches_in_memory(tmp_path, methods):
    store = Store(tmp_path, read_budget_bytes=4096)  # tiny budget: many rounds of read-ahead
    like = make_params(0)
    tokens = [100, 250, 0, 50, 400]
    payloads = []
    manifests = {}
    for k, (m, w) in enumerate(zip(methods, tokens)):
        payloads.append(payload_for(make_params(10 + k), m))
        store.write_update(2, f"s{k}", payloads[-1], {"tokens": w})
        manifests[f"s{k}"] = validate(store, f"s{k}", 2, like, m)
    expected = in_memory_mean(payloads, tokens, like)
    weights = {f"s{k}": float(w) for k, w in enumerate(tokens)}
    got, stats = stream_weighted_mean(store, 2, weights, like, return_stats=True)
    got2 = store.stream_weighted_mean(2, weights, like, manifests=manifests, verify_sha256=True)
    for e, g, g2 in zip(jax.tree.leaves(expected), jax.tree.leaves(got), jax.tree.leaves(got2)):
        assert g.dtype == jnp.float32 and g.shape == e.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))  # one kernel, one set of factors
        np.testing.assert_array_equal(np.asarray(g), np.asarray(g2))
    assert stats["silos"] == 4  # the weight-0 silo is not read
    assert stats["bytes_read"] == sum(manifests[s]["bytes"] for s in weights if weights[s] > 0)


def test_stream_weighted_mean_places_on_shardings(tmp_path):
    store = Store(tmp_path)
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    like = make_params(0)
    shard = {"embed": P("b"), "blocks": [{"w": P("a", "b")}, {"w": P(None, "b")}], "norm": P(), "bias": P()}
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)), like, shard
    )
    payload = payload_for(make_params(3), "int8")
    store.write_update(1, "s1", payload, {"tokens": 5})
    got = stream_weighted_mean(store, 1, {"s1": 5.0}, abstract)
    for g, a in zip(jax.tree.leaves(got), jax.tree.leaves(abstract)):
        assert g.sharding == a.sharding
    ref = compression.decompress(payload, like)  # one silo: the mean is its delta, bit-exactly
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_stream_weighted_mean_rejects_empty_and_undecodable(committed):
    store, delta = committed
    with pytest.raises(ValueError, match="empty"):
        stream_weighted_mean(store, 1, {"s1": 0.0}, delta)
    victim = max(chunk_files(store, 1, "s1", "embed/q"), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(5)
    expect_rejection(lambda: stream_weighted_mean(store, 1, {"s1": 1.0}, delta), "s1", 1, "'embed'")


def test_stream_verify_detects_change_after_validation(tmp_path):
    store = Store(tmp_path, codec="none")
    like = make_params(0)
    store.write_update(1, "s1", payload_for(make_params(1), "none"), {"tokens": 3})
    manifests = {"s1": validate(store, "s1", 1, like, "none")}
    victim = chunk_files(store, 1, "s1", "blocks/0/w/x")[0]
    data = bytearray(open(victim, "rb").read())
    data[8] ^= 0x40
    open(victim, "wb").write(bytes(data))
    stream_weighted_mean(store, 1, {"s1": 3.0}, like, manifests=manifests)  # trusts the validation
    expect_rejection(
        lambda: stream_weighted_mean(store, 1, {"s1": 3.0}, like, manifests=manifests, verify_sha256=True),
        "s1",
        1,
        "'blocks/0/w/x'",
        "changed since validation",
    )


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import jax, jax.numpy as jnp
    from fedjax_lm.store import Store, stream_weighted_mean
    root, n, shapes = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    like = [jax.ShapeDtypeStruct(tuple(s), jnp.float32) for s in shapes]
    store = Store(root, read_budget_bytes=8 << 20)
    def status_kib(field):  # VmRSS: resident now; VmHWM: peak resident (= ru_maxrss)
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1])
    before = status_kib("VmRSS")
    mean, stats = stream_weighted_mean(store, 0, {f"s{k}": 1.0 + k for k in range(n)}, like, return_stats=True)
    peak = max(status_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({"extra_kib": peak - before, "peak_read_bytes": stats["peak_read_bytes"]}))
    """
)


def test_stream_weighted_mean_memory_does_not_scale_with_silos(tmp_path):
    """Peak RSS of an aggregation over 8 silos vs 2, each in a fresh process. Loading all silos
    (or all silos' copies of the big leaf) at once would add >= 6 x 24 MB; streaming adds ~0."""
    shapes = [[1536, 4096], [256, 4096], [256, 4096]]  # 6M + 1M + 1M f32 = 32 MB per silo
    store = Store(tmp_path, codec="none")
    rng = np.random.default_rng(0)
    for k in range(8):
        payload = [{"x": rng.standard_normal(s, dtype=np.float32)} for s in shapes]
        store.write_update(0, f"s{k}", payload, {"tokens": 1 + k})
    # A fixed mmap threshold makes RSS track live memory: with glibc's default (dynamic)
    # threshold, freed buffers < 32 MB stay in per-thread arenas — slack bounded by the thread
    # count, not by the silo count, but it would blur a 2-vs-8 comparison.
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
        "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
    }
    out = {}
    for n in (2, 8):
        res = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path), str(n), json.dumps(shapes)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])
    leaf_mb = 24
    growth_mb = (out[8]["extra_kib"] - out[2]["extra_kib"]) / 1024
    assert growth_mb < 2 * leaf_mb, out  # all-at-once would be >= 6 * 24 MB
    # The reader's own accounting: bounded by max(budget, 2 x largest leaf), whatever the silo count.
    assert out[8]["peak_read_bytes"] == out[2]["peak_read_bytes"] <= 2 * leaf_mb << 20


# ------------------------------------------------------------------------ sharded write


def test_sharded_write_writes_each_shard_once(tmp_path):
    store = Store(tmp_path, chunk_bytes=1 << 10)
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    full = np.arange(64 * 16, dtype=np.float32).reshape(64, 16) / 7.0
    q = np.random.default_rng(0).integers(-127, 128, size=(64, 256), dtype=np.int8)
    payload = {
        "grid": {"x": jax.device_put(full, NamedSharding(mesh, P("a", "b")))},  # 8 distinct shards
        "rows": {"x": jax.device_put(full, NamedSharding(mesh, P("a", None)))},  # 2 shards x 4 replicas
        "proj": {
            "q": jax.device_put(q, NamedSharding(mesh, P(("a", "b"), None))),
            "scale": jax.device_put(np.linspace(0, 1, 64, dtype=np.float32), NamedSharding(mesh, P())),
        },
    }
    m = store.write_update(1, "pod", payload, {"tokens": 1})
    arrays = {a["keypath"]: a for a in m["arrays"]}
    assert len(arrays["grid/x"]["regions"]) == 8
    assert len(arrays["rows/x"]["regions"]) == 2
    assert len(arrays["proj/q"]["regions"]) == 8 and len(arrays["proj/scale"]["regions"]) == 1
    assert arrays["grid/x"]["chunks"] == [32, 4]  # the shard grid
    assert arrays["proj/q"]["chunks"] == [4, 256]  # 8-row shards split to ~1 KiB, aligned
    for key, a in arrays.items():
        lines = "".join(f"{r['origin']}:{r['shape']}:{r['sha256']}\n" for r in a["regions"])
        digest = (
            hashlib.sha256(lines.encode()).hexdigest() if len(a["regions"]) > 1 else a["regions"][0]["sha256"]
        )
        assert a["sha256"] == digest
    # The zarr content equals the full arrays (read with TensorStore directly).
    for key, want in [("grid/x", full), ("rows/x", full), ("proj/q", q)]:
        path = os.path.join(update_folder(store, 1, "pod"), *key.split("/"))
        got = (
            ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}).result().read().result()
        )
        np.testing.assert_array_equal(got, want)
    tmpl = jax.eval_shape(lambda: payload)
    store.validate_update(1, "pod", tmpl, expected_silos=["pod"], current_round=1)
    # Changing one shard's chunk on disk is caught by that region's checksum.
    grid = os.path.join(update_folder(store, 1, "pod"), "grid", "x")
    raw = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": grid}}).result()
    raw[32:64, 12:16].write(np.zeros((32, 4), np.float32)).result()
    expect_rejection(
        lambda: store.validate_update(1, "pod", tmpl, expected_silos=["pod"], current_round=1),
        "pod",
        1,
        "'grid/x' region [32, 12]+[32, 4]",
        "sha256",
    )


# ------------------------------------------------------------------------ memory://


def test_memory_root_updates(tmp_path):
    silo_side = Store("memory://run_mem_test")
    aggregator_side = Store("memory://run_mem_test")  # another handle on the same in-process store
    like = make_params(0)
    payloads = [payload_for(make_params(5 + k), "int8") for k in range(3)]
    for k, p in enumerate(payloads):
        silo_side.write_update(4, f"s{k}", p, {"tokens": 10 * (k + 1)})
    # an uncommitted one on the side
    silo_side.objects.put("updates/4/ghost/manifest.json", b"{}")
    assert aggregator_side.committed_silos(4) == ["s0", "s1", "s2"]
    for k in range(3):
        aggregator_side.validate_update(
            4, f"s{k}", template(like, "int8"), expected_silos=["s0", "s1", "s2"], current_round=4
        )
    got = stream_weighted_mean(aggregator_side, 4, {"s0": 10.0, "s1": 20.0, "s2": 30.0}, like)
    expected = in_memory_mean(payloads, [10, 20, 30], like)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=0, atol=1e-6)
    silo_side.write_run({"config": {"a": 1}})
    assert aggregator_side.read_run() == {"config": {"a": 1}}
    with pytest.raises(ValueError, match="memory://"):
        aggregator_side.latest_global()


# ------------------------------------------------------------------------ Orbax state


def test_publish_and_read_global_onto_another_mesh(tmp_path):
    store = Store(tmp_path)
    mesh8 = jax.make_mesh((8,), ("fsdp",))
    params = {"w": jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8), "b": jnp.arange(8.0)}
    params = {"w": jax.device_put(params["w"], NamedSharding(mesh8, P("fsdp"))), "b": params["b"]}
    tx = optax.sgd(0.7, momentum=0.9, nesterov=True)
    opt_state = tx.init(params)
    assert store.latest_global() is None
    meta = {"silos": ["a", "b"], "deadline": 1.8e9}
    assert store.publish_global(0, params, opt_state, meta)
    # A half-written later round (Orbax's temporary folder) is not visible.
    os.makedirs(os.path.join(store.root, "global", "1.orbax-checkpoint-tmp-1234", "params"))
    assert store.latest_global() == 0 and store.global_rounds() == [0]
    assert store.read_global_meta(0) == {**meta, "round": 0}

    # Idempotent: a second publish of round 0 does not rewrite it.
    folder = os.path.join(store.root, "global", "0")
    stamps = {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, fs in os.walk(folder)
        for f in fs
    }
    other = jax.tree.map(lambda x: x + 1, params)
    assert not store.publish_global(0, other, tx.init(other), {"silos": [], "deadline": 0})
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps

    mesh24 = jax.make_mesh((2, 4), ("x", "y"))
    specs = {"w": P("y", "x"), "b": P("y")}
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh24, s)), params, specs
    )
    abstract_opt = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh24, P())), opt_state
    )
    reader = Store(tmp_path)  # another process's view
    got, got_opt, got_meta = reader.read_global(0, abstract, abstract_opt)
    assert got_meta["silos"] == ["a", "b"] and got_meta["round"] == 0
    for k in params:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(params[k]))
        assert got[k].sharding == abstract[k].sharding
    assert jax.tree.structure(got_opt) == jax.tree.structure(opt_state)
    with pytest.raises(FileNotFoundError):
        reader.read_global_meta(7)
    # extra items (the compressed download's copy and delta) are read alone; unknown names are refused
    delta = {"q": jnp.arange(6, dtype=jnp.int8)}
    assert store.publish_global(1, params, opt_state, {}, {"broadcast": params, "download": delta})
    like = {"q": jax.ShapeDtypeStruct((6,), jnp.int8, sharding=NamedSharding(mesh24, P()))}
    np.testing.assert_array_equal(np.asarray(reader.read_global_item(1, "download", like)["q"]), np.arange(6))
    with pytest.raises(FileNotFoundError, match=r"global/0 .* has no 'download'"):
        reader.read_global_item(0, "download", like)
    with pytest.raises(ValueError, match=r"carries no item \['moments'\]"):
        store.publish_global(2, params, opt_state, {}, {"moments": params})


def test_wait_for_global(tmp_path):
    store = Store(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="global/0"):
        store.wait_for_global(0, timeout_s=0.3, poll_s=0.05)
    assert time.monotonic() - t0 < 5
    params = {"w": jnp.ones((4, 4))}
    Store(tmp_path).publish_global(0, params, optax.sgd(1.0).init(params), {"silos": ["a"]})
    assert store.wait_for_global(0, timeout_s=5, poll_s=0.05)["silos"] == ["a"]


def test_silo_state_round_trip_with_shardings(tmp_path):
    store = Store(tmp_path, keep_silo_states=2)
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    state = {
        "inner": {"mu": jnp.arange(32.0).reshape(8, 4), "count": jnp.asarray(3, jnp.int32)},
        "error": jnp.full((8, 4), 0.25, jnp.float32),
    }
    assert store.latest_silo_state("siloA") is None
    for r in range(3):
        state_r = jax.tree.map(lambda x: x + r, state)
        assert store.save_silo_state("siloA", r, state_r, {"iterator": {"pos": 100 * r}, "round": r})
    assert not store.save_silo_state("siloA", 2, state, {})  # already saved: not rewritten
    assert store.latest_silo_state("siloA") == 2
    assert Store(tmp_path).latest_silo_state("siloA") == 2
    specs = {"inner": {"mu": P("fsdp", "tensor"), "count": P()}, "error": P(None, "fsdp")}
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)), state, specs
    )
    got, meta = store.restore_silo_state("siloA", 2, abstract)
    assert meta == {"iterator": {"pos": 200}, "round": 2}
    want_state = jax.tree.map(lambda x: x + 2, state)
    for g, want, a in zip(jax.tree.leaves(got), jax.tree.leaves(want_state), jax.tree.leaves(abstract)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(want))
        assert g.sharding == a.sharding
    with pytest.raises(FileNotFoundError):
        store.restore_silo_state("siloA", 0, abstract)  # only 2 kept


def test_run_json(tmp_path):
    store = Store(tmp_path / "r")
    with pytest.raises(FileNotFoundError):
        store.read_run()
    store.write_run({"config": {"silos": 4}, "code": "abc"})
    assert Store(tmp_path / "r").read_run() == {"config": {"silos": 4}, "code": "abc"}
    assert [f for f in os.listdir(tmp_path / "r") if f.endswith(".tmp")] == []


# ------------------------------------------------------------------------ lock


def test_lock_second_acquire_names_holder(tmp_path):
    store = Store(tmp_path)
    with store.acquire_aggregator_lock({"run": "r1"}) as lock:
        with pytest.raises(LockHeld) as info:
            Store(tmp_path).acquire_aggregator_lock({"run": "r2"})
        msg = str(info.value)
        assert (
            f"pid {os.getpid()}" in msg
            and repr(lock.record["host"]) in msg
            and "since 20" in msg
            and "r1" in msg
        )
        assert info.value.holder["owner"] == {"run": "r1"}
    # Released on exit: the next aggregator gets it.
    store.acquire_aggregator_lock({"run": "r3"}).release()


def _proc_state(pid):
    st = lock_lib._proc_stat(pid)
    return st[0] if st else None


def test_lock_of_killed_holder_is_taken_over(tmp_path, caplog):
    script = textwrap.dedent(
        """
        import sys, time
        from fedjax_lm.store import Store
        Store(sys.argv[1]).acquire_aggregator_lock({"who": "child"})
        print("locked", flush=True)
        time.sleep(600)
        """
    )
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(LockHeld, match=f"pid {child.pid} "):
            Store(tmp_path).acquire_aggregator_lock({"who": "parent"})
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _proc_state(child.pid) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _proc_state(child.pid) in (None, "Z")  # dead, not yet reaped: a zombie
        with caplog.at_level(logging.WARNING, logger="fedjax_lm.store.lock"):
            lock = Store(tmp_path).acquire_aggregator_lock({"who": "parent"})
        assert any(f"pid {child.pid}" in r.getMessage() and "dead" in r.getMessage() for r in caplog.records)
        assert lock.record["owner"] == {"who": "parent"} and lock.record["pid"] == os.getpid()
        lock.release()
    finally:
        child.kill()
        child.wait()


def test_lock_lease_expiry_for_holder_on_another_host(tmp_path, caplog):
    store = Store(tmp_path)
    lock_a = store.acquire_aggregator_lock({"who": "A"}, lease_s=1.0, host="host-a")
    with pytest.raises(LockHeld, match="host 'host-a'"):
        store.acquire_aggregator_lock({"who": "B"}, lease_s=1.0, host="host-b")
    for _ in range(4):  # refreshed in time: still held past the first lease
        time.sleep(0.35)
        lock_a.refresh()
        with pytest.raises(LockHeld):
            store.acquire_aggregator_lock({"who": "B"}, lease_s=1.0, host="host-b")
    time.sleep(1.2)  # A stops refreshing: its lease expires
    with caplog.at_level(logging.WARNING, logger="fedjax_lm.store.lock"):
        lock_b = store.acquire_aggregator_lock({"who": "B"}, lease_s=1.0, host="host-b")
    assert any("lease expired" in r.getMessage() for r in caplog.records)
    with pytest.raises(LockLost, match="host-b"):
        lock_a.refresh()
    lock_a.release()  # must not remove B's lock
    with pytest.raises(LockHeld, match="host 'host-b'"):
        store.acquire_aggregator_lock({"who": "C"}, host="host-c")
    lock_b.release()


def test_lock_heartbeat_keeps_lease(tmp_path):
    store = Store(tmp_path)
    lock = store.acquire_aggregator_lock({"who": "A"}, lease_s=1.0, host="host-a")
    lock.start_heartbeat(0.1)
    time.sleep(1.6)  # longer than the lease: only the heartbeat keeps it
    with pytest.raises(LockHeld):
        store.acquire_aggregator_lock({"who": "B"}, host="host-b")
    lock.check()
    lock.release()
    store.acquire_aggregator_lock({"who": "B"}, host="host-b").release()


def test_lock_on_object_store_backend():
    """memory:// exercises the conditional-write (generation) path used for gs:// and s3://."""
    store = Store("memory://lock_test")
    lock = store.acquire_aggregator_lock({"who": "A"}, lease_s=0.6, host="host-a")
    with pytest.raises(LockHeld, match="host 'host-a'"):
        store.acquire_aggregator_lock({"who": "B"}, host="host-b")
    time.sleep(0.8)
    lock_b = store.acquire_aggregator_lock({"who": "B"}, host="host-b")
    with pytest.raises(LockLost):
        lock.refresh()
    lock_b.release()
    store.acquire_aggregator_lock({"who": "C"}, host="host-c").release()


# ------------------------------------------------------------------------ lock: who may be taken over

needs_pid_namespace = pytest.mark.skipif(
    not lock_lib.process_identity()["pid_ns"], reason="this machine's pid namespace cannot be read"
)


def _reaped_pid():
    """(pid, start time) of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = lock_lib._pid_start(child.pid)
    child.kill()
    child.wait()
    return child.pid, start


def _plant_holder(store, *, pid_ns, pid, pid_start, age_s=0.0, lease_s=60.0):
    """A lock record of another aggregator on this host name and boot id (another container)."""
    me = lock_lib.process_identity()
    now = time.time()
    record = {
        "owner": {"who": "planted"},
        "host": me["host"],
        "boot_id": me["boot_id"],
        "pid": pid,
        "pid_start": pid_start,
        "since": now - age_s,
        "refreshed": now - age_s,
        "lease_s": lease_s,
        "nonce": "planted",
    }
    if pid_ns is not None:  # None: a record written before the namespace was recorded
        record["pid_ns"] = pid_ns
    store.objects.put_json(lock_lib.LOCK_KEY, record)
    return record


@pytest.fixture(params=["local", "memory"])
def lock_store(request, tmp_path):
    if request.param == "local":
        return Store(tmp_path)
    return Store(f"memory://lock_ns_{os.urandom(8).hex()}")


@needs_pid_namespace
@pytest.mark.parametrize("pid_ns", ["pid:[1]", None], ids=["other-namespace", "no-namespace-recorded"])
def test_lock_dead_pid_in_another_pid_namespace_is_held_while_its_lease_is_fresh(lock_store, pid_ns):
    """Containers on one machine share the boot id (and often the host name) but not pid numbers:
    a pid that is free here may be a live aggregator in the next container."""
    pid, start = _reaped_pid()
    assert not lock_lib.pid_alive(pid, start)
    _plant_holder(lock_store, pid_ns=pid_ns, pid=pid, pid_start=start)
    with pytest.raises(LockHeld, match=f"pid {pid} "):
        lock_store.acquire_aggregator_lock({"who": "me"})
    assert lock_store.objects.get_json(lock_lib.LOCK_KEY)["nonce"] == "planted"


@needs_pid_namespace
def test_lock_dead_pid_in_this_pid_namespace_is_taken_over_at_once(lock_store, caplog):
    pid, start = _reaped_pid()
    _plant_holder(lock_store, pid_ns=lock_lib.process_identity()["pid_ns"], pid=pid, pid_start=start)
    with caplog.at_level(logging.WARNING, logger="fedjax_lm.store.lock"):
        lock = lock_store.acquire_aggregator_lock({"who": "me"})
    assert any(f"pid {pid} " in r.getMessage() and "is dead" in r.getMessage() for r in caplog.records)
    assert lock.record["owner"] == {"who": "me"}
    assert lock.record["pid_ns"] == lock_lib.process_identity()["pid_ns"]
    lock.release()


@needs_pid_namespace
@pytest.mark.parametrize("case", ["dead-in-other-namespace", "alive-in-this-namespace"])
def test_lock_expired_lease_is_taken_over_wherever_the_holder_is(lock_store, caplog, case):
    if case == "dead-in-other-namespace":
        pid, start = _reaped_pid()
        pid_ns = "pid:[1]"
    else:  # a live holder that stopped refreshing (hung) loses the lock too
        me = lock_lib.process_identity()
        pid, start, pid_ns = me["pid"], me["pid_start"], me["pid_ns"]
    _plant_holder(lock_store, pid_ns=pid_ns, pid=pid, pid_start=start, age_s=61.0, lease_s=60.0)
    with caplog.at_level(logging.WARNING, logger="fedjax_lm.store.lock"):
        lock = lock_store.acquire_aggregator_lock({"who": "me"})
    assert any("lease expired" in r.getMessage() for r in caplog.records)
    assert lock.record["owner"] == {"who": "me"}
    lock.release()

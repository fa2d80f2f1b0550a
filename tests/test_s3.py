"""fedjax_lm.store on s3:// against a real S3-compatible server (moto_server on loopback), no mocks.

Each xdist worker starts its own server on a free port (session fixture); each test gets its own
prefix in one bucket. The store learns the endpoint from AWS_ENDPOINT_URL_S3, as a user would.
"""

import contextlib
import http.client
import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import jax
import numpy as np
import optax
import pytest
import tensorstore as ts

from fedjax_lm.store import LockHeld, LockLost, Store, stream_weighted_mean
from fedjax_lm.store import layout
from fedjax_lm.store import lock as lock_lib
from tests.test_store import (
    expect_rejection,
    in_memory_mean,
    leaves_bytes,
    make_params,
    payload_for,
    template,
    validate,
)

BUCKET = "fedjax-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except urllib.error.HTTPError:
        return True  # it answered, with an error status
    except OSError:
        return False


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server on a free loopback port with bucket BUCKET; the AWS_* test environment
    set for the session. Yields the endpoint URL."""
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    assert os.path.exists(exe), f"{exe} is missing: pip install 'moto[server]' (requirements.txt)"
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log_path, "wb") as log:
        for _ in range(3):  # another process may take the free port before the server binds it
            port = _free_port()
            endpoint = f"http://127.0.0.1:{port}"
            proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
            deadline = time.monotonic() + 30
            while proc.poll() is None and not _answers(endpoint) and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None and _answers(endpoint):
                break
            proc.kill()
            proc.wait()
        else:
            pytest.fail(f"moto_server did not start; its log:\n{log_path.read_text()[-3000:]}")
    try:
        req = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")
        urllib.request.urlopen(req, timeout=10).close()
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
                mp.delenv(name, raising=False)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
            yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_root(s3_endpoint, request):
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:8]}"


def raw_kvstore(store: Store, key: str = "") -> ts.KvStore:
    """The bucket under the store's root, straight through TensorStore (to play an attacker)."""
    return ts.KvStore.open(store.layout.kvstore_spec(key)).result()


# ------------------------------------------------------------------------ endpoint


def test_s3_endpoint_and_region_come_from_the_environment(monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    root = layout.Root.parse("s3://b/run/")
    assert root.kvstore_spec("x") == {"driver": "s3", "bucket": "b", "path": "run/x"}
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")  # AWS itself: TensorStore asks the bucket
    assert root.kvstore_spec("x") == {"driver": "s3", "bucket": "b", "path": "run/x"}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1/")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:2")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert root.kvstore_spec("x") == {
        "driver": "s3",
        "bucket": "b",
        "path": "run/x",
        "endpoint": "http://s3only:2",
        "aws_region": "ap-south-1",
    }
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_REGION")
    assert root.kvstore_spec("")["endpoint"] == "http://generic:1"
    assert root.kvstore_spec("")["aws_region"] == "eu-west-1"
    assert layout.Root.parse("gs://b/run").kvstore_spec("x") == {
        "driver": "gcs",
        "bucket": "b",
        "path": "run/x",
    }


# ------------------------------------------------------------------------ small objects


def test_s3_run_json_and_tokenizer(s3_root):
    store = Store(s3_root)
    with pytest.raises(FileNotFoundError):
        store.read_run()
    store.write_run({"config": {"silos": 4}, "code": "abc"})
    assert Store(s3_root).read_run() == {"config": {"silos": 4}, "code": "abc"}
    model = bytes(range(256)) * 40
    sha = store.put_tokenizer(model)
    assert Store(s3_root).get_tokenizer(sha) == model
    with pytest.raises(ValueError, match="does not match the sha256"):
        store.get_tokenizer("0" * 64)


# ------------------------------------------------------------------------ updates


def test_s3_updates_validate_and_stream_mean(s3_root):
    silo_side, aggregator = Store(s3_root), Store(s3_root, read_budget_bytes=4096)
    like = make_params(0)
    methods, tokens = ("int8", "none", "bf16"), (100, 250, 50)
    payloads = [payload_for(make_params(10 + k), m) for k, m in enumerate(methods)]
    for k, (p, w) in enumerate(zip(payloads, tokens)):
        written = silo_side.write_update(2, f"s{k}", p, {"tokens": w, "loss": 2.5})
        assert written["method"] == methods[k]
    silo_side.objects.put("updates/2/ghost/manifest.json", b"{}")  # an uncommitted one on the side
    assert aggregator.committed_silos(2) == ["s0", "s1", "s2"]
    assert aggregator.committed_silos(2, candidates=["s1", "ghost", "s9"]) == ["s1"]
    manifests = {}
    for k, m in enumerate(methods):
        assert aggregator.read_manifest(2, f"s{k}")["tokens"] == tokens[k]
        manifests[f"s{k}"] = validate(aggregator, f"s{k}", 2, like, m, expected_silos=["s0", "s1", "s2"])
        got = aggregator.read_update(2, f"s{k}", template(like, m))
        for a, b in zip(leaves_bytes(payloads[k]), leaves_bytes(got)):
            np.testing.assert_array_equal(a, b)
    weights = {f"s{k}": float(w) for k, w in enumerate(tokens)}
    got, stats = stream_weighted_mean(aggregator, 2, weights, like, manifests=manifests, return_stats=True)
    expected = in_memory_mean(payloads, tokens, like)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))  # the same kernel as in memory
    assert stats["bytes_read"] == sum(m["bytes"] for m in manifests.values())
    # A committed update is not rewritten.
    again = silo_side.write_update(2, "s0", payload_for(make_params(99), "int8"), {"tokens": 1})
    assert again["tokens"] == 100


def test_s3_corrupted_chunk_is_rejected(s3_root):
    store = Store(s3_root, codec="none")  # raw chunks: a flipped byte still decodes
    delta = make_params(1)
    store.write_update(1, "s1", payload_for(delta, "int8"), {"tokens": 10})
    assert validate(store, "s1", 1, delta)["silo"] == "s1"
    entry = next(a for a in store.read_manifest(1, "s1")["arrays"] if a["keypath"] == "blocks/1/w/q")
    chunks = raw_kvstore(store, layout.update_dir(1, "s1") + entry["path"] + "/")
    key = next(k for k in chunks.list().result() if k.startswith(b"c/"))
    data = bytearray(chunks.read(key).result().value)
    data[len(data) // 2] ^= 0x01
    chunks.write(key, bytes(data)).result()  # overwritten in the bucket, marker and manifest intact
    expect_rejection(
        lambda: validate(store, "s1", 1, delta),
        "s1",
        1,
        "'blocks/1/w/q'",
        "sha256 of the stored data does not match",
    )


# ------------------------------------------------------------------------ Orbax


def test_orbax_paths_refuse_s3_with_one_clear_error(s3_root):
    """orbax-checkpoint 0.12.8 cannot write s3:// (it turns the URL into a local 's3:/' folder)."""
    with pytest.raises(NotImplementedError) as info:
        layout.Root.parse(s3_root).orbax_path("global")
    msg = str(info.value)
    assert "\n" not in msg and s3_root in msg
    assert "cannot be written to s3://" in msg and "orbax-checkpoint 0.12.8" in msg


def test_s3_checkpoints_round_trip_through_tensorstore(s3_root):
    """On s3:// the store keeps checkpoints as zarr arrays itself: same API, same guarantees."""
    store = Store(s3_root, keep_silo_states=2)
    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    sharding = jax.sharding.NamedSharding(mesh, jax.P("x"))
    params = {
        "w": jax.device_put(np.arange(8, dtype=np.float32).reshape(4, 2), sharding),
        "b": np.ones(3, np.float32),
    }
    opt = optax.adam(1e-3).init(params)
    assert store.latest_global() is None
    # a crashed publish (arrays, no marker) is invisible and rewritten by the next attempt
    raw_kvstore(store).write("global/0/params/w/zarr.json", b"{}").result()
    assert store.global_rounds() == []
    assert store.publish_global(0, params, opt, {"sampled": ["a"]}) is True
    assert store.publish_global(0, params, opt, {}) is False  # never rewritten
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=sharding if x.ndim == 2 and x.shape[0] == 4 else None
        ),
        params,
    )
    abstract_opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), opt)
    got, got_opt, meta = Store(s3_root).read_global(0, abstract, abstract_opt)
    assert meta == {"round": 0, "sampled": ["a"]} and store.latest_global() == 0
    assert got["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(params["w"]))
    for a, b in zip(jax.tree.leaves(got_opt), jax.tree.leaves(opt)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the compressed download's items travel in the same checkpoint, each readable alone
    delta = {"q": np.arange(6, dtype=np.int8)}
    assert store.publish_global(1, params, opt, {}, {"broadcast": params, "download": delta})
    got = store.read_global_item(1, "download", {"q": jax.ShapeDtypeStruct((6,), np.int8)})
    np.testing.assert_array_equal(got["q"], delta["q"])
    with pytest.raises(FileNotFoundError, match=r"global/0 .* has no 'download'"):
        store.read_global_item(0, "download", {"q": jax.ShapeDtypeStruct((6,), np.int8)})
    for r in range(3):
        assert store.save_silo_state(
            "s1", r, {"e": np.full(2, r, np.float32)}, {"round": r, "it": {"pos": r}}
        )
    assert store.latest_silo_state("s1") == 2
    arrays, meta = store.restore_silo_state("s1", 2, {"e": jax.ShapeDtypeStruct((2,), np.float32)})
    assert meta == {"round": 2, "it": {"pos": 2}} and arrays["e"].tolist() == [2.0, 2.0]
    with pytest.raises(FileNotFoundError, match="round 0"):
        store.restore_silo_state("s1", 0, {"e": jax.ShapeDtypeStruct((2,), np.float32)})  # pruned (keep 2)


def test_a_short_deployment_on_s3_equals_the_one_process_simulation(s3_root, small_corpus, tmp_path):
    """Aggregator and silo processes sharing only an s3:// store (signed), bit for bit the simulation."""
    from tests.test_deploy import Procs, assert_equals_simulation, federation_of, make_config

    config, spec = make_config(small_corpus, tmp_path, rounds=2, signed=True)
    p = Procs(tmp_path, spec)
    p.store = s3_root
    try:
        p.aggregator()
        for s in ("code", "lines", "prose"):
            p.silo(s)
        p.wait("aggregator")
        for s in ("code", "lines", "prose"):
            p.wait(s)
    finally:
        p.close()
    fed = federation_of(config)
    params, _, meta = Store(s3_root).read_global(2, fed.abstract_params, fed.abstract_outer_opt)
    assert meta["accepted"] == ["code", "lines", "prose"] and meta["signed_by"] == "aggregator"
    assert_equals_simulation(
        config, tmp_path, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]
    )
    assert not os.path.exists(tmp_path / "store")  # nothing went to a local folder


# ------------------------------------------------------------------------ lock


def test_s3_lock_acquire_refresh_release_and_takeover(s3_root, caplog):
    store = Store(s3_root)
    lock_a = store.acquire_aggregator_lock({"who": "A"}, lease_s=0.8, host="host-a")
    with pytest.raises(LockHeld, match="host 'host-a'") as info:
        Store(s3_root).acquire_aggregator_lock({"who": "B"}, lease_s=0.8, host="host-b")
    assert info.value.holder["owner"] == {"who": "A"}
    for _ in range(3):  # refreshed in time: still held past the first lease
        time.sleep(0.35)
        lock_a.refresh()
        with pytest.raises(LockHeld):
            store.acquire_aggregator_lock({"who": "B"}, lease_s=0.8, host="host-b")
    lock_a.release()
    # Released: a record saying so (S3 has no conditional delete), free to take without a warning.
    assert "released" in json.loads(store.objects.get(lock_lib.LOCK_KEY))
    with caplog.at_level(logging.WARNING, logger="fedjax_lm.store.lock"):
        lock_b = store.acquire_aggregator_lock({"who": "B"}, lease_s=0.8, host="host-b")
    assert not caplog.records
    time.sleep(1.0)  # B stops refreshing: its lease expires
    with caplog.at_level(logging.WARNING, logger="fedjax_lm.store.lock"):
        lock_c = store.acquire_aggregator_lock({"who": "C"}, lease_s=30, host="host-c")
    assert any("lease expired" in r.getMessage() for r in caplog.records)
    with pytest.raises(LockLost, match="host-c"):
        lock_b.refresh()  # its If-Match on the old ETag is refused
    lock_b.release()  # must not remove C's lock
    with pytest.raises(LockHeld, match="host 'host-c'"):
        store.acquire_aggregator_lock({"who": "D"}, host="host-d")
    lock_c.release()
    store.acquire_aggregator_lock({"who": "D"}, host="host-d").release()
    # The conditional-write probes leave nothing behind.
    assert store.objects.children("locks/") == ["aggregator.lock"]


class _DropConditions(http.server.BaseHTTPRequestHandler):
    """Relays requests to the real server without If-Match / If-None-Match: an S3-compatible
    server that does not implement conditional writes."""

    protocol_version = "HTTP/1.1"
    target = ("127.0.0.1", 0)
    dropped = ("if-match", "if-none-match", "host", "connection")

    def relay(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self.dropped}
        conn = http.client.HTTPConnection(*self.target, timeout=10)
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = relay

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _server_without_conditional_writes(endpoint: str):
    host, port = endpoint.removeprefix("http://").split(":")
    handler = type("Handler", (_DropConditions,), {"target": (host, int(port))})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_s3_lock_refuses_a_server_without_conditional_writes(s3_endpoint, s3_root, monkeypatch):
    with _server_without_conditional_writes(s3_endpoint) as relay:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", relay)
        store = Store(s3_root)
        store.write_run({"ok": True})  # plain reads and writes work through the relay
        assert store.read_run() == {"ok": True}
        with pytest.raises(lock_lib.LockUnsupported, match="does not honour conditional writes") as info:
            store.acquire_aggregator_lock({"who": "A"})
        assert "If-None-Match: *" in str(info.value) and "If-Match" in str(info.value)
        assert relay in str(info.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    assert Store(s3_root).objects.children("locks/") == []  # no lock taken, no probe left

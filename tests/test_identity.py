"""Ed25519 identities: keygen, allow-lists, domain-separated signatures, tree hashes."""

import json
import os
import stat
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lm import identity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_keygen_verb_writes_a_private_key_0600_and_builds_the_allow_list(tmp_path):
    allow = tmp_path / "federation.json"
    for name in ("aggregator", "clinic-a"):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedjax_lm",
                "keygen",
                "--name",
                name,
                "--out",
                str(tmp_path / "k"),
                "--allow_list",
                str(allow),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr
        assert f"added '{name}'" in r.stdout
    key = tmp_path / "k" / "clinic-a.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    listed = identity.AllowList.load(str(allow))
    signer = identity.Signer.load(str(key), "clinic-a")
    listed.check_signer(signer)
    assert listed.keys["clinic-a"] == (tmp_path / "k" / "clinic-a.pub").read_text().strip()
    again = subprocess.run(
        [sys.executable, "-m", "fedjax_lm", "keygen", "--name", "clinic-a", "--out", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert again.returncode == 1 and "is never overwritten" in again.stderr
    assert identity.Signer.load(str(key), "clinic-a").public == signer.public  # untouched


def test_signatures_are_bound_to_signer_domain_and_message(tmp_path):
    a_path, a_pub = identity.generate("a", str(tmp_path))
    _, b_pub = identity.generate("b", str(tmp_path))
    allow = identity.AllowList({"a": a_pub, "b": b_pub})
    a = identity.Signer.load(a_path, "a")
    sig = a.sign(identity.UPDATE_DOMAIN, b"abc")
    assert allow.verify("a", identity.UPDATE_DOMAIN, b"abc", sig) is None
    assert "bad signature" in allow.verify("b", identity.UPDATE_DOMAIN, b"abc", sig)  # another member
    assert "bad signature" in allow.verify("a", identity.GLOBAL_DOMAIN, b"abc", sig)  # another kind
    assert "bad signature" in allow.verify("a", identity.UPDATE_DOMAIN, b"abd", sig)  # another message
    assert allow.verify("a", identity.UPDATE_DOMAIN, b"abc", None) == "unsigned"
    assert "no key" in allow.verify("c", identity.UPDATE_DOMAIN, b"abc", sig)
    assert "bad signature" in allow.verify("a", identity.UPDATE_DOMAIN, b"abc", "not base64!")


def test_signed_meta_detects_any_change(tmp_path):
    path, pub = identity.generate("aggregator", str(tmp_path))
    allow = identity.AllowList({"aggregator": pub})
    meta = identity.sign_meta(
        identity.Signer.load(path, "aggregator"), {"round": 3, "sampled": ["x"], "deadline": 1.5}
    )
    assert identity.verify_meta(allow, meta) is None
    assert identity.verify_meta(allow, json.loads(json.dumps(meta))) is None  # survives a JSON round trip
    assert "bad signature" in identity.verify_meta(allow, {**meta, "sampled": ["x", "y"]})
    assert "not by the 'aggregator'" in identity.verify_meta(allow, {**meta, "signed_by": "x"})


def test_bad_allow_lists_and_keys_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": identity.ALLOW_LIST_FORMAT, "keys": {"a": "ed25519:abc"}}))
    with pytest.raises(identity.IdentityError, match="bad.json: a: not an Ed25519 public key"):
        identity.AllowList.load(str(bad))
    bad.write_text("[]")
    with pytest.raises(identity.IdentityError, match="expected"):
        identity.AllowList.load(str(bad))
    (tmp_path / "x.key").write_text("hello")
    with pytest.raises(identity.IdentityError, match="x.key is not an unencrypted PEM private key"):
        identity.Signer.load(str(tmp_path / "x.key"), "x")
    with pytest.raises(identity.IdentityError, match="cannot read the private key"):
        identity.Signer.load(str(tmp_path / "missing.key"), "x")
    _, pub = identity.generate("a", str(tmp_path))
    with pytest.raises(identity.IdentityError, match="share one public key"):
        identity.AllowList({"a": pub, "b": pub})
    with pytest.raises(identity.IdentityError, match=r"no public key for \['b'\]"):
        identity.AllowList({"a": pub}).require(["a", "b"])


def test_tree_sha256_sees_every_value_name_dtype_and_shape():
    tree = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    h = identity.tree_sha256(tree)
    assert h == identity.tree_sha256(
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    )
    changed = [
        {**tree, "b": np.array([0, 0, 1e-30], np.float32)},
        {**tree, "w": tree["w"].reshape(3, 2)},
        {**tree, "b": np.zeros(3, np.float64)},
        {"w": tree["w"], "c": tree["b"]},
    ]
    assert len({h, *(identity.tree_sha256(t) for t in changed)}) == 5

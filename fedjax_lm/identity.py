"""Who wrote what in the store: Ed25519 keys, the federation's allow-list, signatures, tree hashes.

Every member of a deployment (each silo, and the aggregator under the reserved name
``aggregator``) holds an Ed25519 private key; the federation's *allow-list* maps member names
to public keys. Every process reads the allow-list from its own disk (its operator received it
out of band, like the config) — never from the store, which anyone with write access can change;
the aggregator also records it in the store's run.json so that a process holding a different
list is refused by name.

What is signed (each message prefixed with its domain and a NUL, so a signature made for one
kind of object can never be replayed as another):

* an update: ``fedjax_lm/update/v1`` + the sha256 of the update's manifest.json. The manifest
  names the round, the silo, every payload array's sha256 and ``base_global_sha256``, the hash
  of the global params the update was trained from; so the signature binds all of them.
* a global checkpoint: ``fedjax_lm/global/v1`` + the canonical JSON of its meta, which holds
  the round, the sampled silos, the deadline and ``params_sha256`` / ``opt_state_sha256``.

`tree_sha256` is the hash of a pytree's arrays (keypath, dtype, shape and raw bytes of every
leaf, in tree order): the same value on every machine for the same numbers.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

AGGREGATOR = "aggregator"  # the aggregator's name in the allow-list (no silo may take it)
KEY_PREFIX = "ed25519:"
ALLOW_LIST_FORMAT = "fedjax_lm.allow_list/1"
UPDATE_DOMAIN = b"fedjax_lm/update/v1"
GLOBAL_DOMAIN = b"fedjax_lm/global/v1"
MAX_ALLOW_LIST_BYTES = 1 << 20


class IdentityError(ValueError):
    """A key file, allow-list or signature that cannot be used; the message names the file or member."""


def _message(domain: bytes, message: bytes) -> bytes:
    return domain + b"\0" + message


def encode_public(key: ed25519.Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode()


def decode_public(text: Any, where: str) -> ed25519.Ed25519PublicKey:
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        raise IdentityError(
            f"{where}: a public key is 'ed25519:<base64 of 32 bytes>', got {str(text)[:60]!r}"
        )
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise IdentityError(f"{where}: not an Ed25519 public key ({e})") from None


class Signer:
    """A member's private key, loaded from the PEM file `keygen` wrote."""

    def __init__(self, name: str, key: ed25519.Ed25519PrivateKey, path: str = ""):
        self.name = name
        self._key = key
        self.path = path
        self.public = encode_public(key.public_key())

    @classmethod
    def load(cls, path: str, name: str) -> "Signer":
        path = os.path.expanduser(path)
        try:
            with open(path, "rb") as f:
                data = f.read(64 << 10)
        except OSError as e:
            raise IdentityError(
                f"cannot read the private key {path} of {name!r}: {e.strerror} "
                f"(create one with: python -m fedjax_lm keygen --name {name} --out DIR)"
            ) from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise IdentityError(f"{path} is not an unencrypted PEM private key: {e}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
        return cls(name, key, path)

    def sign(self, domain: bytes, message: bytes) -> str:
        return base64.b64encode(self._key.sign(_message(domain, message))).decode()


class AllowList:
    """The federation's members and their public keys: {name: 'ed25519:<base64>'}."""

    def __init__(self, keys: Mapping[str, str], path: str = ""):
        self.path = path
        self.keys = dict(sorted(keys.items()))
        self._public = {
            name: decode_public(k, f"{path or 'allow-list'}: {name}") for name, k in self.keys.items()
        }
        if len(set(self.keys.values())) != len(self.keys):
            raise IdentityError(f"{path or 'allow-list'}: two members share one public key")

    @classmethod
    def load(cls, path: str) -> "AllowList":
        path = os.path.expanduser(path)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_ALLOW_LIST_BYTES + 1)
        except OSError as e:
            raise IdentityError(f"cannot read the allow-list {path}: {e.strerror}") from None
        if len(data) > MAX_ALLOW_LIST_BYTES:
            raise IdentityError(f"allow-list {path} is larger than {MAX_ALLOW_LIST_BYTES} bytes")
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise IdentityError(f"allow-list {path} is not JSON: {e}") from None
        return cls.from_json(obj, path)

    @classmethod
    def from_json(cls, obj: Any, where: str = "allow-list") -> "AllowList":
        if (
            not isinstance(obj, dict)
            or obj.get("format") != ALLOW_LIST_FORMAT
            or not isinstance(obj.get("keys"), dict)
        ):
            raise IdentityError(
                f"{where}: expected {{'format': '{ALLOW_LIST_FORMAT}', 'keys': {{name: key}}}}"
            )
        return cls(obj["keys"], where)

    def to_json(self) -> dict[str, Any]:
        return {"format": ALLOW_LIST_FORMAT, "keys": dict(self.keys)}

    def require(self, names: list[str]) -> None:
        """Every member named (the aggregator and the federation's silos) has a key."""
        missing = [n for n in names if n not in self.keys]
        if missing:
            raise IdentityError(
                f"allow-list {self.path}: no public key for {missing} (add them with "
                f"python -m fedjax_lm keygen --name NAME --out DIR --allow_list {self.path or 'FILE'})"
            )

    def check_signer(self, signer: Signer) -> None:
        """This process's private key is the one the federation lists under its name."""
        if signer.name not in self.keys:
            raise IdentityError(f"allow-list {self.path} has no key for {signer.name!r}")
        if self.keys[signer.name] != signer.public:
            raise IdentityError(
                f"the private key {signer.path} is not the key the allow-list {self.path} lists for "
                f"{signer.name!r} (its public key is {signer.public})"
            )

    def verify(self, name: str, domain: bytes, message: bytes, signature: Any) -> str | None:
        """None if `signature` is `name`'s over (domain, message), else the reason it is not."""
        key = self._public.get(name)
        if key is None:
            return f"{name!r} has no key in the federation's allow-list"
        if not isinstance(signature, str) or not signature:
            return "unsigned"
        try:
            raw = base64.b64decode(signature, validate=True)
            key.verify(raw, _message(domain, message))
        except (ValueError, InvalidSignature):
            return f"bad signature (not made with the key of {name!r})"
        return None


# ----------------------------------------------------------------------------- key generation


def generate(name: str, out_dir: str) -> tuple[str, str]:
    """Writes OUT/<name>.key (private, mode 0600, never overwritten) and OUT/<name>.pub.
    Returns (private key path, public key text)."""
    from fedjax_lm.store import layout  # member names are store names

    layout.check_silo_name(name)
    os.makedirs(out_dir, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = os.path.join(out_dir, f"{name}.key")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:
        raise IdentityError(f"{path} exists: a key is never overwritten (move it away first)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = encode_public(key.public_key())
    with open(os.path.join(out_dir, f"{name}.pub"), "w") as f:
        f.write(public + "\n")
    return path, public


def add_to_allow_list(path: str, name: str, public: str) -> None:
    """Adds (or confirms) `name`'s key in the allow-list file; refuses to replace another key."""
    keys: dict[str, str] = {}
    if os.path.exists(path):
        keys = dict(AllowList.load(path).keys)
    if keys.get(name, public) != public:
        raise IdentityError(f"{path} already lists another key for {name!r}; edit the file to replace it")
    keys[name] = public
    AllowList(keys, path)  # validates
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(AllowList(keys).to_json(), f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- hashing


def canonical_json(obj: Any) -> bytes:
    """The bytes a JSON object is signed as (sorted keys, no spaces; NaN/Inf refused)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _leaf_bytes(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)  # one leaf at a time on each host
    return np.ascontiguousarray(np.asarray(x))


def tree_sha256(tree: Any) -> str:
    """sha256 over every leaf's keypath, dtype, shape and little-endian bytes, in tree order."""
    from fedjax_lm.store import arrays as arrays_lib

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]

    def leaf_digest(item):
        path, x = item
        a = _leaf_bytes(x)
        head = f"{arrays_lib.keypath_str(path)}|{a.dtype.name}|{list(a.shape)}|".encode()
        return head + hashlib.sha256(arrays_lib.raw_bytes(a)).digest()

    with concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        parts = list(pool.map(leaf_digest, flat))
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def sign_meta(signer: Signer, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The global meta with `signed_by` and a `signature` over the rest of it."""
    body = {k: v for k, v in meta.items() if k != "signature"}
    body["signed_by"] = signer.name
    return {**body, "signature": signer.sign(GLOBAL_DOMAIN, canonical_json(body))}


def verify_meta(allow: AllowList, meta: Mapping[str, Any]) -> str | None:
    """None if the global meta carries the aggregator's valid signature, else why not."""
    body = {k: v for k, v in meta.items() if k != "signature"}
    if body.get("signed_by") != AGGREGATOR:
        return f"signed by {body.get('signed_by')!r}, not by the {AGGREGATOR!r}"
    try:
        message = canonical_json(body)
    except ValueError:
        return "meta holds non-finite numbers"
    return allow.verify(AGGREGATOR, GLOBAL_DOMAIN, message, meta.get("signature"))

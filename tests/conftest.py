"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session, shared with the subprocesses of the
# multi-process tests: the same train step compiled by several silo processes compiles once.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fedjax_lm_test_jax_cache_{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Make `experiments` (config files) importable from tests.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


import pytest  # noqa: E402


def _write_small_sources(root):
    """Three small, different text sources made from the running Python's stdlib (no download)."""
    import sysconfig

    lib = sysconfig.get_paths()["stdlib"]
    files = {
        "code": ["os.py", "typing.py", "functools.py", "dataclasses.py"],
        "prose": ["this.py", "textwrap.py", "difflib.py", "argparse.py"],
    }
    paths = []
    for name, names in files.items():
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        for i, f in enumerate(names):
            with open(os.path.join(lib, f), encoding="utf-8") as src:
                text = src.read()
            with open(os.path.join(d, f"{i}.txt"), "w", encoding="utf-8") as dst:
                dst.write(text if name == "code" else " ".join(text.split()))
        paths.append(f"folder:{d}")
    import json

    jl = os.path.join(root, "lines.jsonl")
    with open(os.path.join(lib, "json", "decoder.py"), encoding="utf-8") as src:
        body = src.read()
    with open(jl, "w", encoding="utf-8") as f:
        for k in range(300):
            f.write(
                json.dumps({"text": f"record {k}: " + body[(k * 97) % 4000 : (k * 97) % 4000 + 400]}) + "\n"
            )
    paths.append(f"jsonl:{jl}")
    return paths


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A prepared 3-silo corpus (vocab 512) shared by the training and federation tests."""
    from fedjax_lm import data as data_lib

    root = tmp_path_factory.mktemp("small_corpus")
    cfg = data_lib.default_data_config()
    cfg.sources = _write_small_sources(str(root / "src"))
    cfg.corpus_dir = str(root / "corpus")
    cfg.vocab_size = 512
    cfg.max_bytes_per_source = 0
    cfg.tokenizer_sample_bytes = 200_000
    cfg.val_fraction = 0.1
    data_lib.prepare(cfg)
    return cfg


@pytest.fixture
def procs():
    """A holder for a test's `Procs` (tests/test_deploy.py) under key "p": every process it started is
    killed when the test ends, pass or fail."""
    holder = {}
    yield holder
    if "p" in holder:
        holder["p"].close()

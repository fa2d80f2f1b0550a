"""The command line: AOT compile for a mesh without running, and clear usage errors."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # __main__ sets the device count itself
    return subprocess.run(
        [sys.executable, "-m", "fedjax_lm", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_compile_reports_per_device_memory_for_a_mesh():
    r = cli("compile", "--config", "experiments/centralized.py:size=tiny,batch_size=8", "--mesh", "1,8,1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1} on 8 cpu devices" in r.stdout
    assert "per-device argument_size" in r.stdout and "per-device peak estimate" in r.stdout
    params = int(r.stdout.split("model: ")[1].split(" params")[0].replace(",", ""))
    assert 1_000_000 < params < 3_000_000  # the tiny preset


def test_usage_errors_name_the_problem():
    r = cli("fly", "--config", "experiments/centralized.py")
    assert r.returncode != 0 and "usage: python -m fedjax_lm <prepare|train" in r.stderr
    r = cli("train", "--config", "experiments/centralized.py")
    assert r.returncode != 0 and "needs --workdir" in r.stderr
    r = cli("train", "--config", "experiments/centralized.py:sizes=tiny", "--workdir", "/tmp/x")
    assert r.returncode != 0 and "unknown config variant key 'sizes'" in r.stderr
    r = cli("compile", "--config", "experiments/centralized.py", "--mesh", "1,8")
    assert r.returncode != 0 and "--mesh must be data,fsdp,tensor" in r.stderr

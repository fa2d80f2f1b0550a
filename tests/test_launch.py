"""Launch scripts: the TPU pod launcher's dry run prints the right commands and refuses bad input."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.sh")


def run(*args):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=ROOT)


BASE = [
    "--project",
    "proj",
    "--zone",
    "us-central2-b",
    "--store",
    "gs://bucket/run",
    "--config",
    "experiments/photon.py:size=1.3b",
    "--aggregator",
    "agg-vm",
    "--repo",
    "https://git.example/fedjax_lm.git",
]


def test_dry_run_starts_every_worker_of_every_slice():
    r = run(
        *BASE,
        "--silo",
        "quotes-en=tpu-a:v4-32",
        "--silo",
        "bible-en=tpu-b:v5litepod-16",
        "--create",
        "--dry-run",
    )
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("+ gcloud")]
    creates = [l for l in lines if "tpu-vm create" in l]
    assert len(creates) == 2 and "--accelerator-type v4-32" in creates[0] and "v5litepod-16" in creates[1]
    starts = [l for l in lines if "tpu-vm ssh" in l and "fedjax_lm\\ silo" in l]
    assert len(starts) == 2
    for line, silo in zip(starts, ("quotes-en", "bible-en")):
        assert "--worker=all" in line
        assert "FEDJAX_DISTRIBUTED=1" in line
        assert f"--silo\\ {silo}" in line and "gs://bucket/run" in line
    agg = [l for l in lines if "compute ssh agg-vm" in l and "aggregate" in l]
    assert len(agg) == 1 and "--store\\ gs://bucket/run" in agg[0]


def test_bad_input_is_named():
    r = run(*BASE, "--silo", "quotes-en", "--dry-run")
    assert r.returncode == 2 and "NAME=TPU_VM:ACCELERATOR" in r.stderr
    r = run(
        *[a if a != "gs://bucket/run" else "/local/path" for a in BASE], "--silo", "a=b:v4-8", "--dry-run"
    )
    assert r.returncode == 2 and "gs://" in r.stderr
    r = run("--zone", "z", "--dry-run")
    assert r.returncode == 2 and "--project is required" in r.stderr

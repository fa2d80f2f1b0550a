"""Every command in the README's code blocks runs, so the README cannot drift from the code.

`readme_commands` extracts each command of every ```bash block; `HOW` says how the test runs it:
  tiny        as written, in a scratch folder, with flags appended that shrink it to seconds
              (the default corpus is replaced by small local folders where the command uses it)
  as-is       exactly as written (it works on what an earlier tiny command produced)
  deployment  as written + tiny flags, started together with the other deployment commands
  help        `python -m fedjax_lm VERB --help` (the real run takes minutes or a pod)
  comply      as written + flags (the README's corpus is the small one), exit 0 or 2 (a verdict either way)
  ci          not run here: it is what .ci/run itself does
A README command missing from `HOW`, or an entry of `HOW` no longer in the README, fails the test.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import _write_small_sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = (
    "--config.data.corpus_dir=cache/readme-corpus --source code=folder:{code} --source prose=folder:{prose}"
)
VOCAB = "--config.model.vocab_size=512 --config.data.vocab_size=512"
FED = (
    f"{VOCAB} --config.federation.rounds=1 --config.federation.local_steps=2 --config.train.batch_size=4 "
    "--config.train.seq_len=32 --config.train.eval_batches=1 --config.federation.deploy.poll_s=0.1"
)
CENTRAL = (
    f"{VOCAB} --config.train.steps=2 --config.train.batch_size=4 --config.train.seq_len=32 "
    "--config.train.eval_batches=1 --config.train.eval_every=0 --config.train.checkpoint_every=2"
)

SIGNED = "--config.federation.deploy.allow_list=keys/federation.json --config.federation.deploy.key=keys/"

# command -> (mode, flags appended in tiny / deployment mode)
HOW = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt -e . && "
    "python -m fedjax_lm train --config experiments/photon.py:size=tiny,silos=8 --workdir runs/photon": (
        "tiny",
        f"{SMALL} {FED}",
    ),
    "python -m pytest -n 2 -q": ("ci", ""),
    "python -m fedjax_lm eval --workdir runs/photon": ("as-is", ""),
    "python -m fedjax_lm generate --workdir runs/photon --prompt 'In the beginning' --max_new_tokens 40": (
        "as-is",
        "",
    ),
    "python -m fedjax_lm export --workdir runs/photon --out runs/photon-hf": ("as-is", ""),
    "python -m fedjax_lm prepare --config experiments/photon.py": ("tiny", f"{SMALL} {VOCAB}"),
    "python -m fedjax_lm train --config experiments/photon.py:size=tiny --workdir runs/photon": (
        "tiny",
        f"{SMALL} {FED}",
    ),
    "python -m fedjax_lm train --config experiments/centralized.py:size=tiny --workdir runs/central": (
        "tiny",
        f"{SMALL} {CENTRAL}",
    ),
    "python -m fedjax_lm eval --workdir runs/central": ("as-is", ""),
    'python -m fedjax_lm generate --workdir runs/central --prompt "def main" --temperature 0.7': (
        "as-is",
        "",
    ),
    "python -m fedjax_lm export --workdir runs/central --out runs/hf": ("as-is", ""),
    "python -m fedjax_lm compile --config experiments/centralized.py:size=1.3b --mesh 1,8,1": ("help", ""),
    "python -m fedjax_lm aggregate --config experiments/photon.py:size=tiny --store runs/store --workdir runs/agg": (
        "help",
        "",
    ),
    "python -m fedjax_lm silo --config experiments/photon.py:size=tiny --store runs/store --silo quotes-en": (
        "help",
        "",
    ),
    "python -m fedjax_lm train --config experiments/from_json.py:runs/photon/run.json --workdir runs/again": (
        "as-is",
        "",
    ),
    "python -m fedjax_lm train --workdir runs/x --config experiments/photon.py:size=tiny,silos=8,K=4,H=64,"
    "rounds=20,outer=diloco,compression=bf16 --config.optim.lr=0.01 --config.federation.inner_state=reset": (
        "tiny",
        f"{SMALL} {FED} --config.federation.silos_per_round=1",
    ),
    "python -m fedjax_lm train --config experiments/photon.py:size=tiny --workdir runs/mine --source "
    "clinic=folder:my-data/clinic --source lab=jsonl:my-data/lab.jsonl:body --config.data.corpus_dir=cache/mine": (
        "tiny",
        FED,
    ),
    "python -m fedjax_lm train --config experiments/photon.py:size=tiny --workdir runs/mine "
    '--config.data.sources=\'["clinic=folder:my-data/clinic", "lab=jsonl:my-data/lab.jsonl:body"]\' '
    "--config.data.corpus_dir=cache/mine": ("tiny", FED),
    "python -m fedjax_lm prepare --config experiments/photon.py:size=tiny --source clinic=folder:my-data/clinic "
    "--config.data.corpus_dir=cache/clinic": ("tiny", FED),
    "python -m fedjax_lm keygen --name quotes-en --out keys --allow_list keys/federation.json": ("as-is", ""),
    "python -m fedjax_lm keygen --name aggregator --out keys --allow_list keys/federation.json": (
        "as-is",
        "",
    ),
    "python -m fedjax_lm keygen --name clinic --out keys --allow_list keys/federation.json": ("as-is", ""),
    "python -m fedjax_lm keygen --name lab --out keys --allow_list keys/federation.json": ("as-is", ""),
    "python -m fedjax_lm aggregate --config experiments/photon.py:size=tiny --store runs/store --workdir runs/agg "
    '--config.train.silos=\'("clinic", "lab")\' --config.data.tokenizer=cache/clinic/tokenizer.model '
    f"{SIGNED}aggregator.key": ("deployment", FED),
    "python -m fedjax_lm silo --config experiments/photon.py:size=tiny --store runs/store "
    f"--source clinic=folder:my-data/clinic --config.data.corpus_dir=cache/clinic {SIGNED}clinic.key": (
        "deployment",
        FED,
    ),
    "python -m fedjax_lm silo --config experiments/photon.py:size=tiny --store runs/store "
    f"--source lab=jsonl:my-data/lab.jsonl:body --config.data.corpus_dir=cache/lab {SIGNED}lab.key": (
        "deployment",
        FED,
    ),
    "python experiments/compare.py --workdir runs/compare": ("help", ""),
    "python -m fedjax_lm sweep --config experiments/photon.py:size=tiny --sweep rounds_vs_H "
    "--workdir runs/sweep-H --print-only": ("as-is", ""),
    "python experiments/attacks.py --workdir runs/attacks": ("help", ""),
    "python experiments/privacy.py --workdir runs/privacy": ("help", ""),
    "python -m fedjax_lm train --config experiments/photon.py:size=tiny,silos=8 --workdir runs/secure "
    "--config.federation.secagg.enabled=True --config.federation.secagg.bound=2.0 "
    "--config.federation.compression=none --config.federation.max_update_norm_ratio=0": (
        "tiny",
        f"{SMALL} {FED}",
    ),
    "python benchmarks/secagg_overhead.py": ("help", ""),
    "python -m fedjax_lm comply --cards experiments/cards --corpus cache/corpus --out runs/compliance": (
        "comply",
        "--corpus=cache/readme-corpus",
    ),
    "python -m fedjax_lm comply --cards experiments/cards --corpus cache/corpus --flop 3.6e14 --out runs/compliance": (
        "comply",
        "--corpus=cache/readme-corpus",
    ),
    "python benchmarks/secagg_overhead.py --silos 8,16 --dropped 2": ("help", ""),
    "python -m fedjax_lm federation --config experiments/worldlm.py:method=hierfavg --store runs/store "
    "--name slavic --workdir runs/slavic": ("help", ""),
    "python -m fedjax_lm train --config experiments/worldlm.py:size=tiny,tree=family --workdir runs/worldlm": (
        "tiny",
        f"{SMALL} {FED} --config.federation.tree.spec=fa(code),fb(prose)",
    ),
    "python -m fedjax_lm sweep --config experiments/worldlm.py:size=tiny,tree=family --sweep methods "
    "--workdir runs/worldlm-family": ("help", ""),
    "python -m fedjax_lm.tree_report runs/worldlm": ("as-is", ""),
    "python -m fedjax_lm sweep --config experiments/worldlm.py:size=tiny,tree=domain --sweep tree_methods "
    "--workdir runs/worldlm-domain": ("help", ""),
    "python -m fedjax_lm train --config experiments/worldlm.py:size=tiny,tree=family,residual=False "
    "--workdir runs/worldlm-family-nores": ("help", ""),
    "python -m fedjax_lm sweep --config experiments/worldlm.py:size=tiny,tree=family3 --sweep tree_methods "
    "--workdir runs/worldlm-family3": ("help", ""),
    "python -m fedjax_lm sweep --config experiments/worldlm.py:size=tiny,tree=family,dp=1000 --sweep methods_dp "
    "--workdir runs/worldlm-family-dp1000": ("help", ""),
    "python -m fedjax_lm sweep --config experiments/worldlm.py:size=tiny,tree=family,dp=1000,unit=federation "
    "--sweep tree_methods_dp --workdir runs/worldlm-family-dp1000-federation": ("help", ""),
    "python -m fedjax_lm sweep --config experiments/worldlm.py:size=tiny,tree=family,dp=1000,clip=1 "
    "--sweep dp_stability --workdir runs/worldlm-family-dp1000-clip1": ("help", ""),
}


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block: continuations joined, comments dropped, spaces normalised."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line.strip()).strip()
            if line and not line.startswith("#"):
                out.append(re.sub(r"\s+", " ", line))
    return out


COMMANDS = readme_commands(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read())


def test_every_readme_command_has_a_way_to_run_and_nothing_stale():
    assert [c for c in COMMANDS if c not in HOW] == [], (
        "add these README commands to HOW in tests/test_readme.py"
    )
    assert [c for c in HOW if c not in COMMANDS] == [], "these HOW entries are no longer in the README"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A user's folder: the repo's experiments/ and benchmarks/, small texts for the default corpus and for my-data/."""
    root = tmp_path_factory.mktemp("readme")
    os.symlink(os.path.join(ROOT, "experiments"), root / "experiments")
    os.symlink(os.path.join(ROOT, "benchmarks"), root / "benchmarks")
    code, prose, lines = (p.split(":", 1)[1] for p in _write_small_sources(str(root / "texts")))
    (root / "my-data").mkdir()
    os.symlink(code, root / "my-data" / "clinic")
    with open(lines) as src, open(root / "my-data" / "lab.jsonl", "w") as dst:
        for line in src:
            dst.write(json.dumps({"body": json.loads(line)["text"]}) + "\n")
    return root, {"code": code, "prose": prose}


def _argv(command: str, extra: str, texts: dict) -> list[str]:
    command = command.split(" && ")[-1]  # the main job after the install steps that CI runs itself
    argv = shlex.split(command) + shlex.split(extra.format(**texts))
    return [sys.executable if a in ("python", "python3") else a for a in argv]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like a user
    return {**env, "PYTHONPATH": ROOT}


def _run(argv, cwd):
    r = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _help(command: str, cwd):
    argv = shlex.split(command)
    if argv[:3] == ["python", "-m", "fedjax_lm"]:
        r = _run([sys.executable, "-m", "fedjax_lm", argv[3], "--help"], cwd)
        assert f"python -m fedjax_lm {argv[3]}:" in r.stdout
    else:
        r = _run([sys.executable, argv[1], "--help"], cwd)
        assert "usage:" in r.stdout


@pytest.mark.parametrize("section", ["main job and verbs", "your own text and its federation"])
def test_readme_commands_run(sandbox, section):
    root, texts = sandbox
    own = {c for c in COMMANDS if "my-data" in c or "keys/" in c or HOW[c][0] == "deployment"}
    picked = [c for c in COMMANDS if (c in own) == (section != "main job and verbs")]
    group = []
    for command in picked:
        mode, extra = HOW[command]
        if mode == "ci":
            continue
        if mode == "help":
            _help(command, root)
        elif mode == "deployment":
            group.append(_argv(command, extra, texts))
        elif mode == "comply":  # exit 2 says the verdict is non-compliant: still a verdict
            argv = _argv(command, extra, texts)
            r = subprocess.run(argv, cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
            assert r.returncode in (0, 2) and "# EU AI Act analysis" in r.stdout, r.stderr[-3000:]
            assert (root / "runs" / "compliance" / "verdict.json").exists()
        else:
            r = _run(_argv(command, extra if mode == "tiny" else "", texts), root)
            if " train " in command:
                assert "pooled" in r.stdout
    if group:  # the aggregator and its silos, started together as separate processes
        procs = [
            subprocess.Popen(
                a, cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for a in group
        ]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        for argv, p, out in zip(group, procs, outs):
            assert p.returncode == 0, f"{shlex.join(argv)}\n{out[-3000:]}"
        assert "accepted ['clinic', 'lab']" in outs[0] and "unsigned federation" not in "".join(outs)
    if section == "main job and verbs":
        assert sorted(os.listdir(root / "runs" / "photon-hf")) == [
            "README.md",  # the model card
            "config.json",
            "model.safetensors",
            "tokenizer.model",
        ]

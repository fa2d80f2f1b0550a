"""Photon's recipe: small local batches, a very high local learning rate, many local steps, FedAvg.

    python -m fedjax_lm train --config experiments/photon.py:size=tiny,silos=8 --workdir runs/photon

8 natural silos of the default corpus (one per source), every silo every round, int8
uploads with error feedback, the global sent down as int8 deltas (round 0 built from the seed). About 4-6 minutes for the tiny model on 2 CPU cores.
Variants: size, silos, K (silos per round, 0 = all), H, rounds, batch_size, lr, outer
(fedavg|fedmom|diloco|fedadam|fedyogi), outer_lr, compression (none|bf16|int8), download (none|bf16|int8,
default int8), inner_state
(keep|reset), parallel, partition (natural|iid|dirichlet), seed.

Sweeps (fedjax_lm/sweep.py says how `add` reads its keywords), each relative to the --config
variant (its rounds x H x batch is the token budget), e.g.

    python -m fedjax_lm sweep --config experiments/photon.py:size=tiny --sweep rounds_vs_H --workdir runs/sweep-H
    python -m fedjax_lm sweep --config experiments/photon.py:size=tiny --sweep rounds_vs_H --workdir runs/sweep-H --print-only

rounds_vs_H, outer, heterogeneity, batch_lr, compression, long.
"""

import math

from experiments import federated

# int8 downloads since docs/results.md question 5: half the main job's traffic for +0.5% perplexity.
PHOTON = dict(batch_size=8, lr=4e-3, H=32, rounds=8, outer="fedavg", download="int8")
# Sequences each silo trains on in the README's main job (8 rounds x H 32 x batch 8).
MAIN_JOB_SEQUENCES = PHOTON["rounds"] * PHOTON["H"] * PHOTON["batch_size"]


def get_config(arg: str | None = None):
    c, _ = federated.build(arg, "photon", PHOTON)
    return c


def _local_steps(base) -> int:
    """The base config's local steps per silo (rounds x H): the budget the sweeps keep fixed."""
    return int(base.federation.rounds) * int(base.federation.local_steps)


def sweep_rounds_vs_H(add, base):
    """Rounds vs H at the base's token budget, with the centralized twin at the same tokens.

    H=1 with FedAvg (outer lr 1) and uncompressed updates averages one local step per silo per
    round: large-batch data-parallel training, except that each silo's AdamW normalises its own
    gradient (the twin is the data-parallel run to compare it with).
    """
    steps = _local_steps(base)
    for h in (1, 4, 8, 32, 128):
        add(H=h, rounds=max(1, steps // h))
    add(H=1, rounds=steps, outer="fedavg", outer_lr=1.0, compression="none")
    add(recipe="centralized")


def sweep_outer_lr_small_H(add, base):
    """The hypothesis of docs/results.md question 1: at H=4 the mean of the silos' AdamW steps is
    ~0.37x a data-parallel step, so an outer lr near 1/0.37 (FedAvg) or Nesterov momentum (DiLoCo)
    should recover much of the gap. (FedAvg lr 1 at H=4 is the rounds_vs_H sweep's H=4 point.)"""
    steps = _local_steps(base)
    for lr in (2.0, 2.7):
        add(H=4, rounds=steps // 4, outer="fedavg", outer_lr=lr)
    add(H=4, rounds=steps // 4, outer="diloco")


def sweep_outer(add, base):
    """Outer optimizer at its literature defaults (FedAvg lr 1, FedMom lr 1 momentum 0.9, DiLoCo's
    Nesterov lr 0.7 momentum 0.9, FedAdam lr 1e-2), DiLoCo's outer lr around 0.7, and with FedAvg the
    silo's inner AdamW moments kept (the base), reset every round, or shared (Photon's averaged moments)."""
    for name in ("fedavg", "fedmom", "diloco", "fedadam"):
        add(outer=name)
    for lr in (0.4, 1.0):
        add(outer="diloco", outer_lr=lr)
    add(outer="fedavg", inner_state="reset")
    add(outer="fedavg", inner_state="keep", **{"federation.aggregate_inner_moments": True})


def sweep_heterogeneity(add, base):
    """Natural silos (one per source) vs iid vs Dirichlet(alpha) mixtures of the sources, same silo
    count, each with its centralized twin. Each partition is its own corpus folder beside the base's
    (the natural one is shared with every other run)."""
    corpus = base.data.corpus_dir
    partitions = [("natural", "natural", {}), ("iid", "iid", {"data.corpus_dir": f"{corpus}-iid"})]
    for alpha in (0.1, 1.0):
        extra = {"data.dirichlet_alpha": alpha, "data.corpus_dir": f"{corpus}-dirichlet-{alpha:g}"}
        partitions.append((f"dirichlet-{alpha:g}", "dirichlet", extra))
    for name, partition, extra in partitions:
        add(name=name, partition=partition, **extra)
    # Each partition's validation sets are its own silos' (other documents held out), so perplexities
    # compare across partitions only through each one's centralized twin on the same corpus.
    for name, partition, extra in partitions:
        add(name=f"{name}-centralized", partition=partition, recipe="centralized", **extra)


def sweep_batch_lr(add, base):
    """Photon's small-batch / high-learning-rate claim: local batch x local lr at the base's tokens
    (H grows as the batch shrinks; the rounds stay)."""
    rounds = int(base.federation.rounds)
    sequences = int(base.federation.local_steps) * int(base.train.batch_size)  # per silo per round
    for lr in (1e-3, 4e-3, 1.6e-2):
        for batch in (4, 8, 32):
            add(lr=lr, batch_size=batch, H=max(1, sequences // batch), rounds=rounds)


def sweep_compression(add, base):
    """Upload encoding none / bf16 / int8 (int8 with and without error feedback), and the compressed
    download (the global sent as an int8 or bf16 delta, fedjax_lm/download.py) with int8 uploads, at
    H=32 and H=128 (the base's token budget): the perplexity cost of each next to its traffic ratio
    vs data-parallel, both directions counted."""
    steps = _local_steps(base)
    for h in (32, 128):
        rounds = max(1, steps // h)
        for method, feedback in (("none", False), ("bf16", True), ("int8", True), ("int8", False)):
            add(compression=method, H=h, rounds=rounds, **{"federation.error_feedback": feedback})
        for down in ("int8", "bf16"):
            add(
                name=f"H{h}-int8-down-{down}",
                compression="int8",
                H=h,
                rounds=rounds,
                **{"federation.error_feedback": True, "federation.download_compression": down},
            )


def sweep_long(add, base):
    """The --config setting (pass the best one found) for 8x the main job's tokens, against its
    centralized twin at the same tokens; the table has the per-silo perplexities."""
    h, batch = int(base.federation.local_steps), int(base.train.batch_size)
    rounds = math.ceil(8 * MAIN_JOB_SEQUENCES / (h * batch))
    add(rounds=rounds)
    add(rounds=rounds, recipe="centralized")

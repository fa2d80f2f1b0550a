"""Photon's recipe: small local batches, a very high local learning rate, many local steps, FedAvg.

    python -m fedjax_lm train --config experiments/photon.py:size=tiny,silos=8 --workdir runs/photon

8 natural silos of the default corpus (one per source), every silo every round, int8
uploads with error feedback. About 4-6 minutes for the tiny model on 2 CPU cores.
Variants: size, silos, K (silos per round, 0 = all), H, rounds, batch_size, lr, outer
(fedavg|fedmom|diloco|fedadam|fedyogi), compression (none|bf16|int8), inner_state
(keep|reset), parallel, partition (natural|iid|dirichlet), seed.
"""

from experiments import federated

PHOTON = dict(batch_size=8, lr=4e-3, H=32, rounds=8, outer="fedavg")


def get_config(arg: str | None = None):
    c, _ = federated.build(arg, "photon", PHOTON)
    return c

"""DiLoCo's recipe: larger local batches, a standard learning rate, Nesterov outer step (0.7, 0.9).

    python -m fedjax_lm train --config experiments/diloco.py:size=tiny,silos=8 --workdir runs/diloco

At the same token budget as photon.py, 4x larger local batches means 4x fewer local
steps per round (H=500 in the paper; here H scales with the CPU budget).
"""

from experiments import federated

DILOCO = dict(batch_size=32, lr=1e-3, H=8, rounds=8, outer="diloco")


def get_config(arg: str | None = None):
    c, _ = federated.build(arg, "diloco", DILOCO)
    return c

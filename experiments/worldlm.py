"""Federations of federations (WorldLM) on the default corpus, and the baselines it is compared with.

    python -m fedjax_lm train --config experiments/worldlm.py:size=tiny,tree=family --workdir runs/worldlm
    python -m fedjax_lm sweep --config experiments/worldlm.py:size=tiny,tree=family --sweep methods --workdir runs/worldlm-family

About 4 minutes per run of the tiny model on 2 CPU cores; the `methods` sweep is 5 runs.

Variants (besides the federated recipes' common keys, fedjax_lm/tree.py says what each field does):
- `tree`: how the 8 silos are grouped, two levels below the root or three
    family   (en/de/es | ru | zh, by language family): 3 federations
    domain   (quotes | scripture | technical docs): 3 federations
    family3  latin(english, continental) | other(cyrillic, han): 2 federations of 2
    domain3  text(quotes, scripture) | code(docs): 2 federations, of 2 and 1
    flat     no federations: the silos under the root
- `method`: local (each silo alone: every layer is a key layer kept at home), fedavg (flat), fedper
  (flat; the key layers stay with each silo), hierfavg (the tree, plain means), worldlm (the tree; key layers
  per federation, attention aggregation, residual embeddings);
- `rounds` is every method's number of *silo* rounds (its token budget): a tree's root runs
  rounds / local_rounds^(depth-1) rounds of its own;
- `L` (local_rounds), `keys` (head: LM head + final norm; head+embed adds the embedding), `T` (temperature),
  `gamma`, `residual`, `attention`;
- `dp`: client-level DP (central) at that target ε for the run's silo rounds (δ = 1e-5; 0 = off), with clip
  norm `clip` (the silos' median update norm is about 14 here); the federations of silos clip and noise
  (fedjax_lm/worldlm.py's docstring says how key layers are released under DP); `unit=federation` protects
  each child of the root as a whole instead (the root clips and noises; nothing inside a federation is).
"""

from experiments import federated
from fedjax_lm import tree as tree_lib

TREES = {
    "flat": "",
    "family": (
        "germanic_romance(quotes-en,quotes-de,bible-en,bible-es,python-docs,kernel-docs),"
        "slavic(quotes-ru),sinitic(poetry-zh)"
    ),
    "domain": "quotes(quotes-en,quotes-de,quotes-ru,poetry-zh),scripture(bible-en,bible-es),docs(python-docs,kernel-docs)",
    "family3": (
        "latin(english(quotes-en,bible-en,python-docs,kernel-docs),continental(quotes-de,bible-es)),"
        "other(cyrillic(quotes-ru),han(poetry-zh))"
    ),
    "domain3": (
        "text(quotes(quotes-en,quotes-de,quotes-ru,poetry-zh),scripture(bible-en,bible-es)),"
        "code(docs(python-docs,kernel-docs))"
    ),
}
KEYS = {
    "head": ("lm_head/.*", "final_norm/.*"),
    "head+embed": ("lm_head/.*", "final_norm/.*", "embed/.*"),
}
METHODS = ("local", "fedavg", "fedper", "hierfavg", "worldlm")
WORLDLM = dict(
    batch_size=8,
    lr=4e-3,
    H=16,
    rounds=16,
    outer="fedavg",
    tree="family",
    method="worldlm",
    L=2,
    keys="head",
    T=0.1,
    gamma=0.5,
    residual=True,
    attention=True,
    dp=0.0,
    clip=10.0,
    unit="silo",
)


def get_config(arg: str | None = None):
    c, v = federated.build(arg, "worldlm", WORLDLM)
    if v["tree"] not in TREES:
        raise ValueError(f"tree={v['tree']!r}: valid trees are {sorted(TREES)}")
    if v["method"] not in METHODS:
        raise ValueError(f"method={v['method']!r}: valid methods are {METHODS}")
    if v["keys"] not in KEYS:
        raise ValueError(f"keys={v['keys']!r}: valid key-layer sets are {sorted(KEYS)}")
    t = c.federation.tree
    nested = v["method"] in ("hierfavg", "worldlm")
    if nested:
        t.spec, t.local_rounds = TREES[v["tree"]], v["L"]
    if v["method"] in ("fedper", "worldlm"):
        t.key_layers = KEYS[v["keys"]]
    if v["method"] == "local":
        t.key_layers, t.key_owner = (".*",), "silo"
    t.key_owner = "silo" if v["method"] in ("fedper", "local") else "federation"
    t.temperature, t.gamma, t.residual, t.attention = v["T"], v["gamma"], v["residual"], v["attention"]
    if v["dp"]:
        c.federation.dp.update(
            dict(mode="central", clip_norm=v["clip"], target_epsilon=v["dp"], unit=v["unit"])
        )
    # rounds is the silos' budget: a tree's root runs fewer rounds of its own (each of several per silo)
    per_root = 1
    if nested:
        silos = [s for s in c.data.sources]
        per_root = tree_lib.parse(t.spec, silos, v["L"]).leaf_rounds()
        if v["rounds"] % per_root:
            raise ValueError(
                f"rounds={v['rounds']} (silo rounds) is not a multiple of the tree's {per_root} silo rounds per "
                "root round"
            )
    c.federation.rounds = v["rounds"] // per_root
    c.name = f"worldlm-{v['method']}-{v['tree'] if nested else 'flat'}-{v['size']}-H{v['H']}"
    if v["dp"]:
        c.name += f"-dp{v['dp']:g}-{v['unit']}"
    return c


def sweep_methods(add, base):
    """The evidence table: local-only, FedAvg, FedPer, HierFAVG and WorldLM at the same tokens."""
    for method in METHODS:
        add(method=method)


def sweep_tree_methods(add, base):
    """The two methods that use the tree (HierFAVG, WorldLM), for another grouping of the same silos."""
    for method in ("hierfavg", "worldlm"):
        add(method=method)


def sweep_methods_dp(add, base):
    """The evidence table under client-level DP (give `dp=EPSILON`): the methods that share anything
    (local-only releases nothing, so it is its own row without DP), WorldLM with and without residual
    embeddings and with the key layers' attention off (then they are part of the noised mean)."""
    if base.federation.dp.mode == "off":
        raise ValueError(
            "sweep methods_dp needs a target epsilon: --config experiments/worldlm.py:...,dp=1000"
        )
    for method in ("fedavg", "fedper", "hierfavg", "worldlm"):
        add(method=method)
    add(method="worldlm", residual=False)
    add(method="worldlm", residual=False, attention=False)


def sweep_tree_methods_dp(add, base):
    """The tree methods under DP (give `dp=EPSILON`, e.g. with unit=federation): HierFAVG and WorldLM with
    and without residual embeddings."""
    if base.federation.dp.mode == "off":
        raise ValueError("sweep tree_methods_dp needs a target epsilon: ...,dp=1000")
    add(method="hierfavg")
    add(method="worldlm")
    add(method="worldlm", residual=False)


def sweep_dp_stability(add, base):
    """Which methods stay stable under DP (give `dp=EPSILON` and a `clip`): flat FedAvg and FedPer (the same
    for either unit), HierFAVG and WorldLM without residual embeddings with each federation as the unit."""
    if base.federation.dp.mode == "off":
        raise ValueError("sweep dp_stability needs a target epsilon: ...,dp=1000")
    add(method="fedavg")
    add(method="fedper")
    add(method="hierfavg", unit="federation")
    add(method="worldlm", residual=False, unit="federation")

"""Tests of fedjax_lm.generate: greedy against a step-by-step unpadded reference, top-k,
seeds, EOS stopping, argument checks, a sharded run, and text through a real tokenizer."""

import dataclasses
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lm import data as data_lib
from fedjax_lm import generate
from fedjax_lm import model as model_lib
from fedjax_lm import sharding as sharding_lib
from fedjax_lm.data import tokenizer as tokenizer_lib

TINY = model_lib.ModelConfig(
    vocab_size=400, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128
)
PROMPT = [3, 17, 250, 9, 101]
N_NEW = 12


@pytest.fixture(scope="module")
def params():
    return sharding_lib.unbox(jax.jit(model_lib.init_params)(TINY, jax.random.key(0)))


@jax.jit
def forward(config, params, tokens_1xL):
    return model_lib.Decoder(config).apply({"params": params}, tokens_1xL)


def last_logits(params, ids):
    """Logits at the last position of an unpadded forward over ids."""
    return np.asarray(forward(TINY, params, jnp.asarray([ids], jnp.int32))[0, -1])


def greedy_reference(params, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = last_logits(params, ids)
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-5, "argmax too close to a tie for a float-exact comparison"
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt) :]


def run(params, prompt=PROMPT, n=N_NEW, **kw):
    return generate.generate_ids(TINY, params, prompt, max_new_tokens=n, **kw)


def test_bucket_length():
    assert generate.bucket_length(17, 128) == 64
    assert generate.bucket_length(64, 128) == 64
    assert generate.bucket_length(65, 128) == 128
    assert generate.bucket_length(100, 80) == 80


def test_greedy_equals_stepwise_reference(params):
    out = run(params, temperature=0.0)
    assert out.shape == (N_NEW,) and out.dtype == np.int32
    assert out.tolist() == greedy_reference(params, PROMPT, N_NEW)


def test_greedy_ignores_the_seed_and_fills_a_capped_buffer(params):
    # max_seq_len 100 (the params do not depend on it): 92 + 8 fills a buffer capped at 100,
    # not rounded up to 128; the attention then runs as 4 query blocks of 25.
    config = dataclasses.replace(TINY, max_seq_len=100)
    assert generate.bucket_length(100, config.max_seq_len) == 100
    prompt = [int(x) for x in np.random.default_rng(0).integers(0, 400, 92)]
    out = generate.generate_ids(config, params, prompt, max_new_tokens=8, rng=jax.random.key(5))
    assert out.tolist() == greedy_reference(params, prompt, 8)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_1_is_greedy(params, temperature):
    greedy = run(params, temperature=0.0)
    out = run(params, temperature=temperature, top_k=1, rng=jax.random.key(7))
    np.testing.assert_array_equal(out, greedy)


def test_seeds(params):
    outs = [run(params, temperature=1.0, top_k=0, rng=jax.random.key(s)) for s in range(4)]
    again = run(params, temperature=1.0, top_k=0, rng=jax.random.key(0))
    np.testing.assert_array_equal(outs[0], again)
    # Near-uniform logits of a fresh model over 400 tokens: 12 equal draws would be ~400^-12.
    assert len({tuple(o.tolist()) for o in outs}) == 4


@pytest.mark.parametrize("k", [3, 10])
def test_top_k_samples_are_in_the_top_k(params, k):
    for seed in range(2):
        out = run(params, temperature=2.0, top_k=k, rng=jax.random.key(seed))
        ids = list(PROMPT)
        for token in out.tolist():
            logits = last_logits(params, ids)
            assert np.sum(logits > logits[token]) < k, (token, np.argsort(logits)[::-1][:k])
            ids.append(token)
        assert len(set(out.tolist())) > 1  # sampled, not a repeated argmax


def test_nothing_is_generated_after_eos(params):
    free = run(params, temperature=1.0, rng=jax.random.key(3)).tolist()
    # An EOS id that the free run samples at step j (first time), with other tokens after it.
    j = next(j for j in range(1, N_NEW - 2) if free[j] not in free[:j] and set(free[j + 1 :]) != {free[j]})
    eos = free[j]
    out = run(params, temperature=1.0, rng=jax.random.key(3), eos_id=eos).tolist()
    assert out[: j + 1] == free[: j + 1]  # same keys per step: the same draws up to EOS
    assert out[j + 1 :] == [eos] * (N_NEW - j - 1)
    # Greedy too: EOS = the greedy token at step 2.
    greedy = run(params).tolist()
    out = run(params, eos_id=greedy[2]).tolist()
    first = greedy.index(greedy[2])
    assert out == greedy[: first + 1] + [greedy[2]] * (N_NEW - first - 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature must be a number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a number >= 0"),
        (dict(temperature=float("inf")), "temperature must be finite"),
        (dict(top_k=-1), "top_k must be an int >= 0"),
        (dict(top_k=401), r"top_k must be <= 400"),
        (dict(top_k=2.5), "top_k must be an int"),
        (dict(n=0), "max_new_tokens must be an int >= 1"),
        (dict(prompt=[]), "prompt_ids must be a non-empty"),
        (dict(prompt=[400]), r"prompt_ids must be in \[0, 400\)"),
        (dict(n=124), r"prompt \(5 tokens\) \+ max_new_tokens \(124\) = 129 exceeds .*max_seq_len \(128\)"),
        (dict(eos_id=400), "eos_id must be <= 399"),
    ],
)
def test_argument_errors(params, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(params, **kwargs)


def test_exact_fit_is_allowed(params):
    assert run(params, n=128 - len(PROMPT)).shape == (123,)


def test_sharded_run_matches(params):
    mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding_lib.DEFAULT_RULES
    boxed = jax.eval_shape(model_lib.init_params, TINY, jax.random.key(0))
    shardings = sharding_lib.tree_shardings(
        sharding_lib.unbox(boxed), sharding_lib.logical_axes(boxed), mesh, rules
    )
    sharded = jax.device_put(params, shardings)
    assert sharded["lm_head"]["kernel"].sharding.spec != ()  # really split over the mesh
    out = generate.generate_ids(TINY, sharded, PROMPT, max_new_tokens=N_NEW, rules=rules, mesh=mesh)
    np.testing.assert_array_equal(out, run(params))


# ------------------------------------------------------------------ real tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    with open(f"{sysconfig.get_paths()['stdlib']}/textwrap.py", encoding="utf-8") as f:
        text = f.read()[:8000]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tokenizer_lib.train_tokenizer(text.split("\n\n"), 400, path)
    tok = data_lib.Tokenizer(path)
    assert tok.vocab_size == TINY.vocab_size
    return tok


def test_generate_text(params, tokenizer):
    prompt = "def wrap(text, width):"
    a = generate.generate_text(TINY, params, tokenizer, prompt, max_new_tokens=16, seed=1)
    b = generate.generate_text(TINY, params, tokenizer, prompt, max_new_tokens=16, seed=1)
    assert isinstance(a, str) and a and a == b
    others = {
        generate.generate_text(TINY, params, tokenizer, prompt, max_new_tokens=16, seed=s) for s in (2, 3)
    }
    assert others != {a}
    # The model sees [EOS] + encode(prompt) (documents follow an EOS in the token files);
    # only the new tokens up to EOS are decoded.
    greedy = generate.generate_text(TINY, params, tokenizer, prompt, max_new_tokens=16, temperature=0.0)
    ids = run(params, [tokenizer.eos_id, *tokenizer.encode(prompt)], 16, eos_id=tokenizer.eos_id).tolist()
    ids = ids[: ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids
    assert greedy == tokenizer.decode(ids)
    with pytest.raises(ValueError, match="prompt must be a non-empty str"):
        generate.generate_text(TINY, params, tokenizer, "")

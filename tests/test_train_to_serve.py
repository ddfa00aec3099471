"""experiments.train_to_serve and experiments.corpus: data, one training step, checkpoint, needles, metrics."""

from __future__ import annotations

import itertools
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tqjax
from experiments import corpus as C
from experiments import train_to_serve as T

TINY = T.ModelConfig(d_model=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, mlp_dim=128, context=64)


@pytest.fixture(scope="module")
def stdlib() -> C.Corpus:
    return C.load_corpus()


def test_stdlib_corpus_is_real_text_split_by_file(stdlib: C.Corpus) -> None:
    train, held = stdlib.train, stdlib.heldout
    assert len(train.files) > 100 and len(held.files) > 10
    assert not set(train.files) & set(held.files)
    assert set(train.files) | set(held.files) <= set(C.stdlib_files(stdlib.root))
    assert 0.03 < len(held.files) / (len(train.files) + len(held.files)) < 0.2
    assert all(C.is_heldout(f, 0.1) for f in held.files) and not any(C.is_heldout(f, 0.1) for f in train.files)
    assert not any(p in C.EXCLUDED_DIRS for f in train.files + held.files for p in f.split("/"))
    path = pathlib.Path(stdlib.root) / held.files[0]
    assert bytes(held.file_tokens(0).astype(np.uint8)) == path.read_bytes()
    assert b"def " in train.data.tobytes() and b"import " in held.data.tobytes()
    assert train.offsets[-1] == train.num_bytes and np.all(np.diff(train.offsets) > 0)


def test_split_is_deterministic_and_skips_excluded(tmp_path: pathlib.Path) -> None:
    for i in range(60):
        sub = tmp_path / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "third.py").write_text("y = 1\n")
    a, b = C.load_corpus(tmp_path), C.load_corpus(tmp_path, heldout_fraction=0.1)
    assert a.train.files == b.train.files and a.heldout.files == b.heldout.files
    assert np.array_equal(a.train.data, b.train.data)
    names = set(a.train.files) | set(a.heldout.files)
    assert len(names) == 60 and "empty.py" not in names and "site-packages/third.py" not in names
    assert a.train.files == tuple(sorted(a.train.files))


def test_pack_batch_rows_and_weights(stdlib: C.Corpus) -> None:
    b = C.pack_batch(stdlib.train, np.random.default_rng(0), 6, 128, 4, 0.5, answer_weight=7.0)
    assert b.tokens.shape == (6, 128) and b.query_start_loc.shape == (6, 5)
    assert np.all(b.query_start_loc[:, 0] == 0) and np.all(b.query_start_loc[:, -1] == 128)
    assert np.all(np.diff(b.query_start_loc, axis=1) >= 0)
    for row, qsl, weight in zip(b.tokens, b.query_start_loc, b.target_weight):
        bounds = sorted(set(qsl.tolist()))
        for lo, hi in itertools.pairwise(bounds):
            expected = np.ones(hi - lo - 1, np.float32)
            if row[hi - 1] == C.NEEDLE_CLOSE and C.QUERY in row[lo:hi]:  # a needle example
                assert row[hi - C.ANSWER_LEN - C.QUERY_LEN] == C.QUERY
                expected[-(C.QUERY_LEN - 1 + C.ANSWER_LEN) :] = 7.0  # key, separator and answer after QUERY
            np.testing.assert_array_equal(weight[lo : hi - 1], expected)
            if hi < 128:
                assert weight[hi - 1] == 0  # no target across a segment boundary
    assert (b.tokens == C.QUERY).any() and b.tokens.max() < C.VOCAB_SIZE


@pytest.mark.parametrize("length", [C.NEEDLE_LEN, 40, 64, 248])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_lands_where_it_says(stdlib: C.Corpus, length: int, depth: float) -> None:
    ex = C.make_needle_example(stdlib.heldout, np.random.default_rng(length), length, depth)
    s = ex.needle_start
    assert len(ex.context) == length and s == round(depth * (length - C.NEEDLE_LEN))
    if depth == 0.0:
        assert s == 0
    if depth == 1.0:
        assert s + C.NEEDLE_LEN == length
    needle = ex.context[s : s + C.NEEDLE_LEN]
    key = needle[1 : 1 + C.KEY_LEN]
    assert needle[0] == C.NEEDLE_OPEN and needle[-1] == C.NEEDLE_CLOSE and needle[1 + C.KEY_LEN] == C.NEEDLE_SEP
    assert np.array_equal(needle[2 + C.KEY_LEN : -1], ex.value)
    assert np.array_equal(ex.query, np.concatenate([[C.QUERY], key, [C.NEEDLE_SEP]]))
    assert np.array_equal(ex.answer, np.concatenate([ex.value, [C.NEEDLE_CLOSE]]))
    assert np.all((ex.value >= ord("0")) & (ex.value <= ord("9")))
    assert (ex.context >= 256).sum() == 3  # only the needle's markers are special tokens
    with pytest.raises(ValueError):
        C.needle_position(length, 1.5)


def test_perplexity_of_known_distributions() -> None:
    v, n = C.VOCAB_SIZE, 50
    targets = jnp.asarray(np.random.default_rng(0).integers(0, v, n))
    uniform = T.token_logprobs(jnp.zeros((n, v)), targets)
    assert T.perplexity(np.asarray(uniform)) == pytest.approx(v, rel=1e-5)
    one_hot = 200.0 * jnp.eye(v)[targets]
    assert T.perplexity(np.asarray(T.token_logprobs(one_hot, targets))) == pytest.approx(1.0, abs=1e-6)
    half = jnp.full((n, v), -jnp.inf).at[jnp.arange(n), targets].set(0.0).at[jnp.arange(n), (targets + 1) % v].set(0.0)
    assert T.perplexity(np.asarray(T.token_logprobs(half, targets))) == pytest.approx(2.0, rel=1e-6)


def test_one_training_step_lowers_the_loss(stdlib: C.Corpus) -> None:
    model = T.build_model(TINY, "turboquant_k8v4")
    b = C.pack_batch(stdlib.train, np.random.default_rng(1), 4, TINY.context, 3, 0.3)
    args = (jnp.asarray(b.tokens), jnp.asarray(b.query_start_loc), jnp.asarray(b.target_weight), jnp.float32(3e-3))
    graphdef, params = nnx.split(model)
    params, opt, before = T.train_step(graphdef, params, T.adam_init(params), *args)
    _, opt, after = T.train_step(graphdef, params, opt, *args)
    assert int(opt.step) == 2
    assert float(after) < float(before)
    assert float(before) == pytest.approx(np.log(C.VOCAB_SIZE), rel=0.1)  # untrained: near uniform


def test_checkpoint_round_trip_reproduces_logits(stdlib: C.Corpus, tmp_path: pathlib.Path) -> None:
    model = T.build_model(TINY, "turboquant_4bit_nc", seed=3)
    T.save_checkpoint(model, TINY, tmp_path, dict(steps=0))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == T.CHECKPOINT_FORMAT and config["context"] == TINY.context
    with np.load(tmp_path / "model.npz") as z:
        assert "blocks/1/attn/q_proj/kernel" in z.files and "embed/embedding" in z.files
    loaded, cfg = T.load_checkpoint(tmp_path, ["turboquant_3bit_nc", "turboquant_k8v4"])
    assert cfg == TINY and loaded.kv_cache_dtypes == ["turboquant_3bit_nc", "turboquant_k8v4"]
    windows = stdlib.heldout.windows(3, TINY.context, 0)
    assert np.array_equal(T.exact_logits(model, windows), T.exact_logits(loaded, windows))
    fresh = T.exact_logits(T.build_model(TINY, "turboquant_4bit_nc", seed=4), windows)
    assert not np.array_equal(fresh, T.exact_logits(loaded, windows))


def test_paged_prefill_matches_exact_attention(stdlib: C.Corpus) -> None:
    model = T.build_model(TINY, "turboquant_k8v4", seed=5)
    windows = stdlib.heldout.windows(2, TINY.context, 1)
    half = TINY.context // 2
    server = T.PagedServer(model, 2, TINY.context, 16, prefill_group=2)
    logits, greedy = server.run(list(windows[:, :half]), windows[:, half : half + 3], 2)
    exact = T.exact_logits(model, windows)
    assert logits.shape == (2, 4, C.VOCAB_SIZE) and greedy.shape == (2, 2)
    np.testing.assert_allclose(logits[:, 0], exact[:, half - 1], atol=1e-4, rtol=1e-4)  # prefill: exact K/V
    np.testing.assert_array_equal(greedy[:, 0], logits[:, -1].argmax(-1))


def test_generation_agreement() -> None:
    ref = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    got = np.array([[1, 2, 0, 4], [5, 6, 7, 8]])
    assert T.generation_agreement(got, ref) == (7 / 8, (2 + 4) / 2)


def test_select_configs_by_name_and_pattern() -> None:
    configs = T.serving_configs(4, 128)
    assert list(T.select_configs(configs, "*")) == list(configs)
    picked = T.select_configs(configs, "turboquant_4bit_nc, *+boundary")
    assert "turboquant_4bit_nc" in picked and "turboquant_k8v4" not in picked
    assert all(k == "turboquant_4bit_nc" or k.endswith("+boundary") for k in picked)
    assert any(k.endswith("+boundary") for k in picked)
    with pytest.raises(ValueError, match="matches no configuration"):
        T.select_configs(configs, "turboquant_9bit")


def test_boundary_configs_use_native_layers_and_their_bytes() -> None:
    """'+boundary' configurations keep real unquantized "auto" first/last layers (no emulation), and
    the memory accounting counts their bf16 K and V: 2 * 2 * head_dim bytes per token per KV head."""
    configs = T.serving_configs(4, 64)
    q = "turboquant_3bit_nc"
    assert configs[f"{q}+boundary"] == ["auto", q, q, "auto"]
    assert not any(k.endswith("+boundary") for k in T.serving_configs(3, 64))  # at most half stay native
    cfg = T.SIZES["cpu"].model
    row = T.memory_row(configs[f"{q}+boundary"], cfg, 16, 2**30)
    native = 2 * 2 * cfg.head_dim * cfg.num_kv_heads
    quant = tqjax.TurboQuantConfig.from_cache_dtype(q, cfg.head_dim).slot_bytes * cfg.num_kv_heads
    assert row["bytes_per_token_per_layer"] == [native, quant, quant, native]
    assert row["max_tokens_in_budget"] == 2**30 // ((2 * native + 2 * quant) * 16) * 16
    exact = T.memory_row(None, cfg, 16, 2**30)
    assert exact["bytes_per_token_per_layer"] == [native] * 4
    assert exact["max_tokens_in_budget"] == tqjax.tokens_in_budget(tqjax.cache_config("auto", 64), 2**30, 16, 2, 4)

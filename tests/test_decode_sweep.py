"""``python -m experiments.decode_sweep`` on the CPU: its small configuration runs and writes what its docstring
promises (the reference path timed, the interpret-mode kernels checked; not GPU timings)."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np

import tqjax
from experiments import decode_sweep

PRESETS = ["turboquant_4bit_nc", "turboquant_k3p5v4"]


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_writes_decode_and_store_results(tmp_path, capsys, monkeypatch) -> None:
    """Without ``--in-jit`` the rows leave its column empty, and without ``XLA_FLAGS`` no header names it."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # (conftest's, read by XLA when jax started: no effect on it)
    decode_sweep.main(["--presets", *PRESETS, "--batch", "1", "2", "--context", "64", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "NOT GPU timings" in out
    assert "in-jit us" not in out.split("== store kernel")[0] and "XLA_FLAGS" not in out  # (the store's table has one)
    # the interpret-mode kernel against the reference, each preset: the same float32 math summed in another order
    # (pieces, merge), then rounded to the bfloat16 output: at most one bfloat16 step apart, 2**-5 below |out| 8
    # (the outputs are convex combinations of values drawn standard normal)
    diffs = dict(re.findall(r"kernel vs reference \((\w+)\): max \|diff\| = (\S+)", out))
    assert sorted(diffs) == sorted(PRESETS) and all(float(x) <= 2.0**-5 for x in diffs.values()), diffs
    decode = _rows(tmp_path / "decode.csv")
    assert sorted((r["system"], int(r["batch"]), int(r["context"])) for r in decode) == sorted(
        (p, b, 64) for p in PRESETS for b in (1, 2))
    for r in decode:  # quantized attention against float32 attention on the unquantized K/V: close, not equal
        assert 0 < float(r["rel_err"]) < 0.5 and float(r["time_us"]) > 0 and r["in_jit_us"] == "", r
    store = _rows(tmp_path / "store.csv")
    assert sorted((r["preset"], int(r["tokens"])) for r in store) == sorted((p, n) for p in PRESETS for n in (16, 256))
    assert all(math.isfinite(float(r["in_jit_time_us"])) and float(r["time_us"]) > 0 for r in store)
    results = json.loads((tmp_path / "decode.json").read_text())
    assert results["meta"]["hk"] == 2 and results["meta"]["spare_pages"] == 8 and results["meta"]["xla_flags"] == ""
    assert len(results["decode"]) == 4 and len(results["store"]) == 4
    assert (tmp_path / "decode.png").stat().st_size > 0


def test_sweep_in_jit_steps(tmp_path, capsys, monkeypatch) -> None:
    """``--in-jit S``: every decode row also timed as a step of S in one jitted loop (a column, and the speed-up
    table from it where there are peers). ``XLA_FLAGS`` (a CUDA graph for every call: docs/PERFORMANCE.md) is named
    in the header, the table's title and the JSON where set (the sweep above: not where unset)."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_graph_min_graph_size=1")
    decode_sweep.main(["--presets", "turboquant_4bit_nc", "--batch", "1", "--context", "64", "--no-store",
                       "--in-jit", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "in-jit us" in out and out.count("XLA_FLAGS=--xla_gpu_graph_min_graph_size=1") == 2
    assert json.loads((tmp_path / "decode.json").read_text())["meta"]["xla_flags"] == "--xla_gpu_graph_min_graph_size=1"
    [r] = _rows(tmp_path / "decode.csv")
    assert float(r["in_jit_us"]) > 0 and float(r["time_us"]) > 0


def test_speedup_table_from_either_timing() -> None:
    rows = [decode_sweep.Row("turboquant_4bit_nc", 32, 16384, 300.0, 1, 1.0, 0.5, 0.1, 250.0),
            decode_sweep.Row("jax_paged_bf16", 32, 16384, 900.0, 1, 1.0, 0.5, 0.0, 800.0),
            decode_sweep.Row("jax_paged_int8", 32, 16384, 1200.0, 1, 1.0, 0.5, 0.0, None)]
    [per_call] = decode_sweep.speedup_table(rows)
    assert "jax_paged_bf16:  3.00x" in per_call and "jax_paged_int8:  4.00x" in per_call
    [looped] = decode_sweep.speedup_table(rows, "in_jit_us")
    assert "jax_paged_bf16:  3.20x" in looped and "int8" not in looped


def test_store_only_sweep(tmp_path) -> None:
    decode_sweep.main(["--presets", "turboquant_k8v4", "--no-decode", "--out", str(tmp_path)])
    assert _rows(tmp_path / "decode.csv") == []
    assert [int(r["tokens"]) for r in _rows(tmp_path / "store.csv")] == [16, 256]
    assert json.loads((tmp_path / "decode.json").read_text())["decode"] == []


def test_fill_cache_leaves_spare_pages_unwritten() -> None:
    """The sweep's caches hold the batch's pages and spare ones (a page count that is not a power of two)."""
    rng = np.random.default_rng(3)
    k, v = decode_sweep.random_kv(rng, 64, 2, 64)
    cfg = tqjax.TurboQuantConfig.from_cache_dtype("turboquant_4bit_nc", 64)
    cache = decode_sweep.fill_cache(cfg, k, v, 16, 2, spare_pages=3)
    assert cache.num_blocks == 64 // 16 + 3
    codes = np.asarray(cache.key_codes)
    assert np.any(codes[:, :4] != 0) and not np.any(codes[:, 4:])

"""``python -m experiments.mgpu_decode_compare`` on the CPU: its caches of a chosen page count and its turns, with a
stand-in module for the kernel (the Mosaic decode itself needs a Hopper GPU: its rows say so)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from experiments import mgpu_decode_compare
from experiments.device_check import build

STAND_IN = '''
from tqjax.reference import paged_decode_reference



def paged_decode_mgpu(query, cache, block_tables, seq_lens, *, num_splits=None, stages=2):
    return paged_decode_reference(query, cache, block_tables, seq_lens)
'''


def test_turns_and_cache_size(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(mgpu_decode_compare, "copy_bandwidth", lambda: 1e9)  # not a figure under test
    path = tmp_path / "stand_in.py"
    path.write_text(STAND_IN)
    mgpu_decode_compare.main(["--points", "4bit_nc/1/64/10", "--against", str(path), "--repeats", "3"])
    out = capsys.readouterr().out
    assert "this S=default FAILED RuntimeError" in out  # off a Hopper GPU
    turns = re.search(r"RESULT \('turboquant_4bit_nc \(10 pages\)', 1, 64, 'stand_in S=default', .*\) \[(.*)\]", out)
    assert turns is not None, out
    assert len(turns.group(1).split(",")) == 3  # one time a turn
    assert re.search(r"RESULT turboquant_4bit_nc \(10 pages\) \| 1 \| 64 \| stand_in S=default \| [\d.]+ \| [\d.]+ \| "
                     r"0\.0e\+00", out), out


def test_build_takes_a_larger_cache() -> None:
    rng = np.random.default_rng(0)
    _, cache, tables, lens = build("turboquant_4bit_nc", 2, 40, 4, 2, 64, 16, rng, pages=11)
    assert cache.num_blocks == 11 and tables.shape == (2, 3) and np.asarray(lens).tolist() == [40, 40]
    assert len(set(np.asarray(tables).ravel().tolist())) == 6 and int(np.asarray(tables).max()) < 11
    with pytest.raises(ValueError, match="fewer than"):
        build("turboquant_4bit_nc", 2, 40, 4, 2, 64, 16, rng, pages=5)

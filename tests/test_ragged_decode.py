"""experiments.ragged_decode's cases and caches (CPU): the timing itself needs a Hopper GPU."""

from __future__ import annotations

import numpy as np

from experiments import ragged_decode


def test_cases_fit_their_tables():
    for label, width, lens in ragged_decode.cases():
        batch = int(label[2:label.index(",")]) if label.startswith("B=") else ragged_decode.B
        assert lens.shape == (batch,), label
        assert lens.max() <= width and lens.min() > 0, label
    totals = {label: int(lens.sum()) for label, _, lens in ragged_decode.cases()}
    assert abs(totals["16.8k in a 32k table"] - totals["1k-32k in a 32k table"]) < ragged_decode.B
    assert totals["7.9k in a 128k table"] <= totals["128k + 31 x 4k"] < totals["7.9k in a 128k table"] + 32


def test_build_gives_each_sequence_its_own_pages():
    lens = np.array([5, 40, 0, 17])
    cache, tables, got_lens = ragged_decode.build("turboquant_4bit_nc", lens, width=64)
    used = [1, 3, 0, 2]  # pages of 16 tokens
    assert cache.num_blocks == sum(used) + 8
    assert tables.shape == (4, 4)
    tables = np.asarray(tables)
    pages = np.concatenate([tables[b, :u] for b, u in enumerate(used)])
    assert len(set(pages.tolist())) == len(pages) and pages.max() < cache.num_blocks
    assert all((tables[b, u:] == 0).all() for b, u in enumerate(used))
    np.testing.assert_array_equal(np.asarray(got_lens), lens)

"""experiments.piece_schedule's list schedule (CPU)."""

from __future__ import annotations

import numpy as np

from experiments import piece_schedule


def test_list_schedule_takes_the_next_program_when_a_slot_frees():
    assert piece_schedule.end_of([3, 3, 3], resident=2, overhead=0) == 6
    assert piece_schedule.end_of([1, 1, 4], resident=2, overhead=1) == 7  # the 4 starts at 2, on the first free slot
    assert piece_schedule.end_of([4, 1, 1], resident=2, overhead=0) == 4  # longest first: the short ones fill in


def test_pieces_of_a_random_batch_run_longest_first():
    lens = np.random.default_rng(0).integers(1024, 32769, 128)
    steps, seq, chunk = piece_schedule.piece_steps(lens, 2048, 528)
    assert steps.sum() == np.ceil(lens / 64).sum() and set(seq.tolist()) == set(range(128))
    last = steps[steps != chunk]
    assert (np.diff(last) <= 0).all()

"""experiments.merge_probe: the ncu parser, and the probe's CPU run (interpret mode: its plumbing and checks)."""

from __future__ import annotations

import pytest

from experiments.merge_probe import main, parse_ncu

NCU = """VARIANT B=1 ctx=4096 pieces=64 block=64 groups=1 err=0.00e+00
==PROF== Disconnected
  tq_merge_pieces (8, 16, 1)x(32, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: Command line profiler metrics
    gpu__time_duration.sum          us         5.63
  tq_merge_pieces (8, 16, 1)x(32, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    gpu__time_duration.sum          ns       5,120.00
VARIANT B=32 ctx=16384 pieces=132 block=4 groups=16 err=3.91e-03
  tq_merge_pieces (256, 1, 1)x(32, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    gpu__time_duration.sum          us         7.00
  other_kernel (1, 1, 1)x(32, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    gpu__time_duration.sum          us        99.00
  tq_merge_pieces (256, 1, 1)x(32, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    gpu__time_duration.sum          ms         0.0061
"""


def test_parse_pairs_durations_with_variants_in_order():
    """Durations in us/ns/ms (thousands separators too), other kernels skipped, the median of each variant's."""
    rows = parse_ncu(NCU, launches=2)
    assert [v.split()[3] for v, _, _ in rows] == ["block=64", "block=4"]
    assert rows[0][2] == pytest.approx([5.63, 5.12]) and rows[0][1] == pytest.approx(5.375)
    assert rows[1][2] == pytest.approx([7.0, 6.1]) and rows[1][1] == pytest.approx(6.55)
    with pytest.raises(ValueError, match="5 merge launches for 2 variants"):
        parse_ncu(NCU.replace("us         7.00", "us  7.00\n  tq_merge_pieces (1) Context 1\n   gpu__time_duration.sum us 1.0"),
                  launches=2)


def test_probe_runs_every_variant_against_the_reference_on_a_cpu(capsys):
    """Interpret mode: the default block and explicit ones, 1 and all 16 groups, each checked (err printed)."""
    main(["--points", "2/512", "--blocks", "default", "2", "16", "--groups", "1", "16", "--launches", "1"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("VARIANT")]
    assert len(lines) == 6
    assert all(float(ln.split("err=")[1]) < 2.0**-7 for ln in lines)

"""The device probes' plumbing: experiments.ncu_times (pairing ncu's durations with a probe's variants), and the CPU
runs of experiments.merge_probe and experiments.prologue_probe (interpret mode: every variant checked)."""

from __future__ import annotations

import pytest

from experiments import merge_probe, prologue_probe
from experiments.ncu_times import variant_times

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


def test_variant_times_pair_durations_with_variants_in_order():
    """Durations in us/ns/ms (thousands separators too), other kernels skipped, the median of each variant's; a
    count that does not match is an error."""
    rows = variant_times(NCU, "tq_merge_pieces", launches=2)
    assert [v.split()[3] for v, _, _ in rows] == ["block=64", "block=4"]
    assert rows[0][2] == pytest.approx([5.63, 5.12]) and rows[0][1] == pytest.approx(5.375)
    assert rows[1][2] == pytest.approx([7.0, 6.1]) and rows[1][1] == pytest.approx(6.55)
    with pytest.raises(ValueError, match="4 tq_merge_pieces launches for 2 variants of 1"):
        variant_times(NCU, "tq_merge_pieces", launches=1)


def test_merge_probe_runs_every_variant_against_the_reference_on_a_cpu(capsys):
    """Interpret mode: the default block, 1 and all 16 groups, 4 warps, each checked (err printed). (Groups of 16
    cost ~10 s a variant here; the merge's other blocks and warps are tests/test_pieces.py's.)"""
    merge_probe.main(["--points", "2/512", "--blocks", "default", "--groups", "1", "16", "--warps", "4",
                      "--launches", "1"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("VARIANT")]
    assert [ln.split()[5] for ln in lines] == ["groups=1", "groups=16"] and all("warps=4" in ln for ln in lines)
    assert all(float(ln.split("err=")[1]) < 2.0**-7 for ln in lines)


def test_prologue_probe_checks_variants_against_the_first(capsys):
    """Interpret mode: the variants' rows within 4e-6 and their tables equal to the first's; a malformed variant is
    refused before anything runs. (The outer products' form costs ~20 s here: tests/test_decode_mgpu.py's
    test_decode_prologue checks it.)"""
    prologue_probe.main(["--points", "3/512", "--variants", "shared/chunks/8", "apart/chunks/4/c2", "apart/hadamard/2",
                         "--launches", "1"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("VARIANT")]
    assert [ln.split()[3] for ln in lines] == ["shared/chunks/8", "apart/chunks/4/c2", "apart/hadamard/2"]
    assert float(lines[0].split("err=")[1]) == 0 and all(float(ln.split("err=")[1]) < 4e-6 for ln in lines[1:])
    with pytest.raises(Exception, match="shared|apart"):
        prologue_probe.main(["--variants", "both/outer/4"])


def test_probe_points_given_or_by_backend():
    """Points as given, else the CPU's defaults here; a malformed one exits with its text."""
    from experiments.ncu_times import probe_points

    assert probe_points(["4/128", "1/64"], ["9/9"], ["1/1"]) == [(4, 128), (1, 64)]
    assert probe_points(None, ["9/9"], ["2/512"]) == [(2, 512)]
    with pytest.raises(SystemExit, match="32x16384"):
        probe_points(["32x16384"], [], [])

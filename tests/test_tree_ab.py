"""experiments.tree_ab: two trees of the library timed in alternating processes. On the CPU its plumbing (children,
ROW lines, the table, the outputs compared), not timings."""

from __future__ import annotations

import argparse
import os

import pytest

from experiments import tree_ab


def test_parse_case() -> None:
    assert tree_ab.parse_case("mosaic/32/16384") == ("mosaic", 32, 16384)
    for bad in ("mosaic/32", "flash/1/4096", "triton/0/64", "triton/x/64"):
        with pytest.raises(argparse.ArgumentTypeError, match="impl/B/context"):
            tree_ab.parse_case(bad)


def test_summarise_takes_medians_over_rounds(tmp_path) -> None:
    lines = ["ROW this mosaic 1 4096 in-jit 10.0 11.0 12.0", "ROW tree mosaic 1 4096 in-jit 20.0 21.0 22.0",
             "ROW this mosaic 1 4096 in-jit 13.0 14.0 15.0", "ROW tree mosaic 1 4096 in-jit 23.0 24.0 25.0",
             "ROW this mosaic 1 4096 call 5.0", "noise"]
    table = tree_ab.summarise(lines, ("this", "tree"), str(tmp_path))
    assert table[1] == "mosaic | 1 | 4096 | in-jit | 12.5 | 22.5 | 0.556 | 10.0 11.0 12.0 13.0 14.0 15.0 / " \
                       "20.0 21.0 22.0 23.0 24.0 25.0"
    assert table[2].startswith("mosaic | 1 | 4096 | call |") and "missing" in table[2]


def test_two_trees_on_the_cpu(tmp_path, capsys) -> None:
    """This checkout against a tree linking to its tqjax: the tree's child imports the tree's package, both children
    run, the case gets both trees' figures (both timings), equal outputs. (One case: the children's interpret-mode
    decodes are most of the test's time; several cases' rows are test_summarise_takes_medians_over_rounds's.)"""
    (tmp_path / "tqjax").symlink_to(os.path.join(tree_ab.ROOT, "tqjax"))
    tree_ab.main(["--tree", str(tmp_path), "--cases", "default/2/48", "--rounds", "1", "--steps", "2"])
    out = capsys.readouterr().out
    assert f"tree {tmp_path / 'tqjax' / '__init__.py'}" in out
    assert f"this {os.path.join(tree_ab.ROOT, 'tqjax', '__init__.py')}" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("default |")]
    assert len(rows) == 2 and not any("missing" in r for r in rows), out
    assert "default_2_48: max |this - tree| 0.000e+00" in out


def test_tree_must_hold_tqjax(tmp_path) -> None:
    with pytest.raises(SystemExit):
        tree_ab.main(["--tree", str(tmp_path)])

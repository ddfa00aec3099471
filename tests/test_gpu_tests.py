"""experiments.gpu_tests: the dealing of test ids and a whole run over a throwaway test file (CPU)."""

from __future__ import annotations

import pytest

from experiments import gpu_tests

TESTS = '''
import pytest

@pytest.mark.gpu
@pytest.mark.parametrize("i", range(5))
def test_passes(i):
    assert i < 5

@pytest.mark.gpu
def test_maybe(tmp_path):
    assert {ok}

def test_unmarked():
    raise AssertionError("selected although not marked")
'''


def test_deal_round_robin_keeps_every_id_once():
    ids = [f"t::{i}" for i in range(7)]
    hands = gpu_tests.deal(ids, 3)
    assert hands == [["t::0", "t::3", "t::6"], ["t::1", "t::4"], ["t::2", "t::5"]]
    assert gpu_tests.deal(ids[:2], 4) == [["t::0"], ["t::1"]]  # no empty shard
    with pytest.raises(ValueError, match="at least 1"):
        gpu_tests.deal(ids, 0)


@pytest.mark.parametrize("ok", [True, False])
def test_run_reports_each_shard_and_fails_when_one_fails(ok, tmp_path, monkeypatch, capsys):
    (tmp_path / "test_throwaway.py").write_text(TESTS.format(ok=ok))
    monkeypatch.chdir(tmp_path)
    code = gpu_tests.main(["test_throwaway.py", "--shards", "2", "--out", str(tmp_path / "logs")])
    out = capsys.readouterr().out
    assert code == (0 if ok else 1), out
    assert "6 tests in 2 processes" in out
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["shard0.log", "shard1.log"]
    assert ("every shard passed" in out) == ok
    assert ("FAILED test_throwaway.py::test_maybe" in out) == (not ok)


def test_nothing_selected_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "test_throwaway.py").write_text("def test_unmarked():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="gave no tests"):
        gpu_tests.main(["test_throwaway.py", "--out", str(tmp_path)])

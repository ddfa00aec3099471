"""experiments.ncu_loop on a small Nsight Compute SASS page: the loop found by execution counts, the samples
by reason with the ones the page has no column for."""

from __future__ import annotations

import csv

from experiments import ncu_loop

COLUMNS = ["Address", "Source", ncu_loop.SAMPLES, ncu_loop.EXECUTED, "stall_barrier", "stall_wait",
           "stall_barrier (Not Issued)"]
# a prologue (once per warp: 8 warps), a 3-instruction loop run 100 steps by 8 warps with one branch taken by
# 2 warps (the page copies), an epilogue
PAGE = [
    ("0x0", "LDC R1, c[0x0][0x28]", 4, 8, 0, 4),
    ("0x10", "LDS.128 R24, [R41]", 30, 800, 20, 10),
    ("0x20", "HGMMA.64x16x16.F32 R32, gdesc[UR12].tnspA, R32", 50, 800, 0, 10),
    ("0x30", "UTMALDG.4D [UR56], [UR20]", 6, 200, 0, 6),
    ("0x40", "@!P2 BRA 0x10", 10, 800, 10, 0),
    ("0x50", "EXIT", 1, 8, 0, 1),
]


def test_loop_reasons_and_unlisted(tmp_path, capsys):
    path = tmp_path / "sass.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "tq_decode_mgpu_mosaic_gpu_kernel"])
        w.writerow(COLUMNS)
        for addr, src, samples, executed, barrier, wait in PAGE:
            w.writerow([addr, src, samples, executed, barrier, wait, 0])
    loop, step_count, fewer = ncu_loop.loop_rows(ncu_loop.read(str(path)))
    assert step_count == 800
    assert [r["Address"] for r in loop] == ["0x10", "0x20", "0x40"]
    assert [r["Address"] for r in fewer] == ["0x30"]
    ncu_loop.main([str(path), "--top", "2"])
    out = capsys.readouterr().out
    assert "3 SASS instructions per warp and step (each run 800 times), 1 more" in out
    assert "95.0% of the 101 warp-state samples" in out  # the loop's 96
    # the loop's 96 samples: barrier 30, wait 26, and 40 the page names no reason for (the HGMMA's)
    assert "unlisted 41.7%, barrier 31.2%, wait 27.1%" in out
    assert "HGMMA.64x16x16.F32" in out.splitlines()[4] and "unlisted 39.6%" in out.splitlines()[4]

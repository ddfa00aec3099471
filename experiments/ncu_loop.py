"""Where a kernel's main loop spends its warps' time, from an Nsight Compute report's SASS page.

    ncu --clock-control none -k regex:tq_decode_mgpu --launch-skip 2 -c 1 --set full -o prof \\
        python -m experiments.mgpu_decode_compare --points 4bit_nc/32/16384 --once
    ncu -i prof.ncu-rep --page source --csv --print-source sass > sass.csv
    python -m experiments.ncu_loop sass.csv [--top 25]

The loop is told apart by execution counts: its instructions run once per step in every warp, the most
common count among the kernel's instructions that ran more than a few times per warp; instructions that ran
in fewer warps (the page copies of one warp) are counted apart, as the warps run them. Printed: instructions
per warp and step, the loop's share of the warp-state samples, the samples by stall reason (their share of the
loop's; "unlisted": reasons the page has no column for, such as the tensor cores' ``gmma``), the loop's opcodes,
and the instructions with the most samples with their two main reasons.
"""

from __future__ import annotations

import argparse
import collections
import csv

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def read(path: str) -> list[dict[str, str]]:
    """The report's SASS rows (the first line names the kernel, the second holds the columns)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[1]
    return [dict(zip(header, r)) for r in rows[2:] if len(r) == len(header)]


def opcode(source: str) -> str:
    """'@!P2 BRA 0x1d39028530' -> 'BRA'."""
    words = source.split()
    return words[1] if words[0].startswith("@") else words[0]


def loop_rows(rows: list[dict[str, str]]) -> tuple[list[dict[str, str]], int, list[dict[str, str]]]:
    """(the loop's instructions, their execution count, instructions in the loop's range run by fewer warps)."""
    counts = [int(r[EXECUTED] or 0) for r in rows]
    top = max(counts)
    # the most common count among instructions that ran at least a tenth as often as the most run one
    step_count = collections.Counter(c for c in counts if c >= top // 10).most_common(1)[0][0]
    index = [i for i, c in enumerate(counts) if c == step_count]
    first, last = index[0], index[-1]
    inside = rows[first:last + 1]
    loop = [r for r in inside if int(r[EXECUTED] or 0) == step_count]
    fewer = [r for r in inside if step_count // 16 <= int(r[EXECUTED] or 0) < step_count]
    return loop, step_count, fewer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--top", type=int, default=25, help="instructions with the most samples to list")
    args = ap.parse_args(argv)
    rows = read(args.csv)
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    loop, step_count, fewer = loop_rows(rows)
    total = sum(int(r[SAMPLES] or 0) for r in rows)
    in_loop = sum(int(r[SAMPLES] or 0) for r in loop + fewer)
    print(f"loop: {len(loop)} SASS instructions per warp and step (each run {step_count} times), "
          f"{len(fewer)} more run by fewer warps; {in_loop / total:.1%} of the {total} warp-state samples")
    by_reason = {k[len("stall_"):]: sum(int(r[k] or 0) for r in loop + fewer) for k in reasons}
    # the page's columns lack some reasons (the tensor cores' ``gmma``, ``warpgroup_arrive``): the rest of the samples
    by_reason["unlisted"] = in_loop - sum(by_reason.values())
    print("samples by reason (share of the loop's):",
          ", ".join(f"{k} {v / in_loop:.1%}" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1])
                    if v / in_loop >= 0.005))
    ops = collections.Counter(opcode(r["Source"]) for r in loop)
    print("opcodes:", ", ".join(f"{k} {v}" for k, v in ops.most_common(16)))
    print("instructions with the most samples (share of all samples, top two reasons):")
    for r in sorted(loop + fewer, key=lambda r: -int(r[SAMPLES] or 0))[:args.top]:
        named = [(int(r[k] or 0), k[len("stall_"):]) for k in reasons]
        named.append((int(r[SAMPLES] or 0) - sum(n for n, _ in named), "unlisted"))
        main_two = sorted(named, reverse=True)[:2]
        why = " ".join(f"{name} {n / total:.1%}" for n, name in main_two if n)
        print(f"  {int(r[SAMPLES] or 0) / total:5.1%}  {r['Source'].strip()[:64]:64s} {why}")


if __name__ == "__main__":
    main()

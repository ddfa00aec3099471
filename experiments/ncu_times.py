"""Kernel durations from Nsight Compute, paired with a probe's variants: a probe prints a ``VARIANT <text>`` line
for each variant after launching its kernel ``launches`` times; under

    ncu --clock-control none --kernel-name regex:<kernel> --metrics gpu__time_duration.sum python -m <probe> > out.txt
    python -m experiments.ncu_times out.txt --kernel <kernel> [--launches 3]

the k-th ``VARIANT`` line owns the k-th run of ``launches`` durations of ``kernel``: a table of median us per variant
(``experiments.merge_probe``, ``experiments.prologue_probe``).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys

_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def variant_times(text: str, kernel: str, launches: int) -> list[tuple[str, float, list[float]]]:
    """ncu's output with the probe's stdout -> [(variant, median us, the launches' us)]."""
    durations, variants, pending = [], [], False
    for line in text.splitlines():
        if line.startswith("VARIANT "):
            variants.append(line[len("VARIANT "):])
        elif kernel in line and "Context" in line:
            pending = True
        elif pending and "gpu__time_duration" in line:
            *_, unit, value = line.split()
            durations.append(float(value.replace(",", "")) * _UNITS[unit])
            pending = False
    if len(durations) != launches * len(variants):
        raise ValueError(f"{len(durations)} {kernel} launches for {len(variants)} variants of {launches} launches")
    return [(v, statistics.median(durations[k * launches:(k + 1) * launches]),
             durations[k * launches:(k + 1) * launches]) for k, v in enumerate(variants)]


def probe_points(given: list[str] | None, gpu: list[str], cpu: list[str]) -> list[tuple[int, int]]:
    """A probe's ``B/context`` points: ``given``, else ``gpu`` or ``cpu`` by JAX's backend; exits on a bad one."""
    import jax

    points = []
    for p in given or (gpu if jax.default_backend() == "gpu" else cpu):
        if not re.fullmatch(r"\d+/\d+", p):
            sys.exit(f"a point is B/context, got {p!r}")
        points.append(tuple(int(x) for x in p.split("/")))
    return points


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ncu_output")
    ap.add_argument("--kernel", required=True, help="the kernel's name as ncu prints it")
    ap.add_argument("--launches", type=int, default=3)
    args = ap.parse_args(argv)
    with open(args.ncu_output) as f:
        rows = variant_times(f.read(), args.kernel, args.launches)
    print("us (median) | variant | launches")
    for variant, us, each in rows:
        print(f"{us:8.2f} | {variant} | {' '.join(f'{x:.2f}' for x in each)}")


if __name__ == "__main__":
    main()

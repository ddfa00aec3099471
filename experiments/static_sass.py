"""Static view of the decode and store kernels' machine code, without a GPU: registers, spills and SASS counts.

    pip install triton            # into a separate environment (its LLVM stays out of jax's process)
    python -m experiments.static_sass --triton-python /path/to/that/env/bin/python \
        --variants turboquant_4bit_nc/mma/32/2,turboquant_4bit_nc/mma_t/32/2

Each variant is preset/dot_mode/block_tokens/num_warps[/tf32][/prmt] (the float16 split is the default
precision; ``tf32`` takes SPLIT_QUERY; the lookup is "poly_fma", or "prmt"), or ``store:preset/block_tokens/num_warps[/head_dim][/cuda]`` for the store kernel
(straight-line code: the static count is what one program executes; ``/elem`` is then per token and
channel of its tile, key and value together). This process lowers the kernel with jax's Pallas Triton
lowering (export for CUDA, as on a machine without a GPU) and keeps the Triton IR; the other Python
compiles that IR with its Triton for sm_90 (floating-point contraction off, like the kernel's
explicit FMAs) and counts, from the cubin: registers, local memory (spills), shared memory, SASS
instructions by opcode, and ``/elem``: the count times the threads over one step's tokens x head_dim
(the loop body dominates the counts: the kernel is one loop over the sequence's pages), i.e. static
instructions per key element per step, comparable across launches.

``--target gfx942`` (or another AMD architecture: ``gfx90a``, ``gfx950``) is the ROCm view instead: the kernels
lowered for ROCm (the portable store arithmetic; the decode's lookup "poly", ROCm's default, unless the variant
names another), compiled by Triton's AMD backend for that architecture (wavefronts of 64), and counted from the
AMDGPU assembly's own summary: vector registers (VGPR and AGPR), scalar registers, scratch (spills), the waves a
SIMD holds (occupancy), shared memory (LDS) and the instruction count. No AMD GPU exists here, so this is the
only check that the ROCm kernels compile past the Triton IR, and of what they cost.

A proxy, not a measurement: the Triton here is PyPI's, not the one XLA bundles on the GPU machine
(on the H200 with jax 0.11.2 the tuned 4bit_nc kernel used 240 registers; Triton 3.9 here gives
about 165), and counts are static, not executed. Time the variants that look better on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def capture(variants: list[str], out_dir: str, platform: str = "cuda") -> list[dict]:
    """Lower each variant's kernel for ``platform`` ("cuda" or "rocm") and write its Triton IR; returns the
    manifest."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import lowering

    import tqjax
    from tqjax.pallas import decode

    captured: list[str] = []
    original = lowering.lower_jaxpr_to_triton_module

    def keep(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = keep
    manifest = []
    try:
        for v in variants:
            if v.startswith("store:"):
                manifest.append(_capture_store(v, out_dir, len(manifest), captured, platform))
                continue
            name, dot_mode, block_tokens, num_warps, *flags = v.split("/")
            precision = decode.SPLIT_QUERY if "tf32" in flags else decode.SPLIT_F16
            if platform == "rocm" and "prmt" in flags:
                raise ValueError(f"{v}: the prmt lookup is inline PTX, CUDA only")
            lookup = "prmt" if "prmt" in flags else "poly" if dot_mode == "fma" or platform == "rocm" else "poly_fma"
            cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, 128)
            cache = tqjax.PagedKVCache.allocate(cfg, 64, 16, 8)
            args = (jnp.zeros((4, 32, 128), jnp.bfloat16), cache, jnp.zeros((4, 16), jnp.int32),
                    jnp.full((4,), 100, jnp.int32))

            def f(q, cache, tables, lens, dot_mode=dot_mode, block_tokens=int(block_tokens),
                  num_warps=int(num_warps), precision=precision, lookup=lookup):
                return decode._paged_decode(
                    q, cache, tables, lens, scale=0.1, softcap=None, num_splits=2, block_tokens=block_tokens,
                    num_warps=num_warps, num_stages=1, lookup=lookup,
                    dot_mode=dot_mode, interpret=False, precision=precision)

            captured.clear()
            jax.export.export(
                jax.jit(f), platforms=[platform],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
            )(*args)
            path = os.path.join(out_dir, f"k{len(manifest)}.ttir")
            with open(path, "w") as fh:
                fh.write(captured[-1])
            manifest.append({"variant": v, "path": path, "num_warps": int(num_warps), "block_tokens": int(block_tokens)})
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    return manifest


def _capture_store(variant: str, out_dir: str, index: int, captured: list[str], platform: str = "cuda") -> dict:
    """``store:preset/block_tokens/num_warps[/head_dim][/cuda]``: the store kernel's Triton IR (Hk=8, D=128
    unless given, 4 tiles of tokens; ``cuda``: ``arithmetic="cuda"``, else "portable"), lowered for
    ``platform``."""
    import jax
    import jax.numpy as jnp

    import tqjax
    from tqjax.pallas import store

    name, block_tokens, num_warps, *rest = variant[len("store:"):].split("/")
    arithmetic = "cuda" if "cuda" in rest else "portable"
    head_dim = next((int(x) for x in rest if x.isdigit()), 128)
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim)
    cache = tqjax.PagedKVCache.allocate(cfg, 64, 16, 8)
    n = 4 * int(block_tokens)
    kv = jnp.zeros((n, 8, head_dim), jnp.bfloat16)

    def f(cache, k, v, slots, block_tokens=int(block_tokens), num_warps=int(num_warps)):
        return store._store_impl(cache, k, v, slots, block_tokens=block_tokens, num_warps=num_warps,
                                 arithmetic=arithmetic)

    captured.clear()
    jax.export.export(
        jax.jit(f), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(cache, kv, kv, jnp.arange(n, dtype=jnp.int32))
    path = os.path.join(out_dir, f"k{index}.ttir")
    with open(path, "w") as fh:
        fh.write(captured[-1])
    return {"variant": variant, "path": path, "num_warps": int(num_warps), "block_tokens": int(block_tokens)}


#: The AMDGPU assembly's summary lines (``; NumVgprs: 118``) that :func:`amdgpu_usage` reads.
AMDGPU_FIELDS = ("NumVgprs", "NumAgprs", "TotalNumVgprs", "TotalNumSgprs", "ScratchSize", "Occupancy")


def amdgpu_usage(asm: str) -> dict[str, int]:
    """The resource summary Triton's AMD backend leaves in a kernel's assembly (``; NumVgprs: 118`` and so on:
    :data:`AMDGPU_FIELDS`), ``instructions``: the lines that are machine instructions (scalar, vector, LDS and
    memory: ``s_``, ``v_``, ``ds_``, ``global_``, ``buffer_``, ``flat_``, ``scratch_``), and ``mfma``: {opcode: count}
    of the matrix instructions among them (``v_mfma_*``; none where the products became vector FMAs)."""
    import collections
    import re

    out = {}
    for field in AMDGPU_FIELDS:
        m = re.search(rf"^\s*; {field}: (\d+)\s*$", asm, re.MULTILINE)
        if m is None:
            raise ValueError(f"no '; {field}:' line in the assembly")
        out[field] = int(m.group(1))
    out["instructions"] = sum(
        1 for ln in asm.splitlines() if re.match(r"\s+(s|v|ds|global|buffer|flat|scratch)_\w+", ln))
    out["mfma"] = dict(collections.Counter(re.findall(r"^\s+(v_mfma_\w+)", asm, re.MULTILINE)))
    return out


def compile_and_count_amd(manifest: list[dict], arch: str) -> None:
    """(Runs under the Triton environment.) Compile each IR for the AMD architecture ``arch`` and print one row per
    variant: :func:`amdgpu_usage` and the shared memory (LDS)."""
    import triton
    from triton.backends.compiler import GPUTarget

    print(f"triton {triton.__version__}, target {arch} (wave64), counts from the AMDGPU assembly's summary")
    print(f"{'variant':36s} {'vgpr':>5s} {'agpr':>5s} {'sgpr':>5s} {'scratch':>7s} {'waves/SIMD':>10s} {'lds':>6s} "
          f"{'instr':>6s}  matrix instructions")
    for item in manifest:
        kernel = triton.compile(item["path"], target=GPUTarget("hip", arch, 64),
                                options={"num_warps": item["num_warps"], "num_stages": 1})
        u = amdgpu_usage(kernel.asm["amdgcn"])
        print(f"{item['variant']:36s} {u['NumVgprs']:>5d} {u['NumAgprs']:>5d} {u['TotalNumSgprs']:>5d} "
              f"{u['ScratchSize']:>7d} {u['Occupancy']:>10d} {kernel.metadata.shared:>6d} {u['instructions']:>6d}  "
              + (", ".join(f"{op} {n}" for op, n in sorted(u["mfma"].items())) or "none"))


def compile_and_count(manifest: list[dict]) -> None:
    """(Runs under the Triton environment.) Compile each IR for sm_90 and print one row per variant."""
    import collections
    import pathlib
    import re

    import triton
    from triton.backends.compiler import GPUTarget

    tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    print(f"triton {triton.__version__}, target sm_90, counts from cuobjdump of the cubin")
    print(f"{'variant':36s} {'regs':>5s} {'local':>6s} {'smem':>6s} {'sass':>6s} {'/elem':>6s}  top opcodes")
    for item in manifest:
        kernel = triton.compile(item["path"], target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": item["num_warps"], "num_stages": 1, "enable_fp_fusion": False})
        cubin = item["path"][:-5] + ".cubin"
        pathlib.Path(cubin).write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tools / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
        ops = collections.Counter(
            m.group(1).split(".")[0]
            for m in (re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", ln) for ln in sass.splitlines())
            if m
        )
        regs = re.search(r"REG:(\d+)", usage).group(1)
        local = re.search(r"LOCAL:(\d+)", usage).group(1)
        top = " ".join(f"{o}:{c}" for o, c in ops.most_common(12))
        total = sum(ops.values())
        per_elem = total * 32 * item["num_warps"] / (item["block_tokens"] * 128)  # all threads / one step's T x D
        print(f"{item['variant']:36s} {regs:>5s} {local:>6s} {kernel.metadata.shared:>6d} {total:>6d} {per_elem:6.1f}  {top}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="turboquant_4bit_nc/mma/32/2,turboquant_4bit_nc/mma_t/32/2")
    ap.add_argument("--triton-python", help="a Python with `triton` installed (compiles the captured IR)")
    ap.add_argument("--target", default="sm_90",
                    help="sm_90 (CUDA), or an AMD architecture such as gfx942: the ROCm lowering and Triton's AMD backend")
    ap.add_argument("--compile-manifest", help=argparse.SUPPRESS)  # the second process's entry
    args = ap.parse_args()
    amd = args.target.startswith("gfx")
    if not amd and args.target != "sm_90":
        ap.error(f"--target must be sm_90 or an AMD gfx architecture, got {args.target!r}")
    if args.compile_manifest:
        with open(args.compile_manifest) as fh:
            manifest = json.load(fh)
        if amd:
            compile_and_count_amd(manifest, args.target)
        else:
            compile_and_count(manifest)
        return
    if not args.triton_python:
        ap.error("--triton-python is required (a separate environment with `pip install triton`)")
    out_dir = tempfile.mkdtemp(prefix="tq_sass_")
    manifest = capture(args.variants.split(","), out_dir, "rocm" if amd else "cuda")
    path = os.path.join(out_dir, "manifest.json")
    with open(path, "w") as fh:
        json.dump(manifest, fh)
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([args.triton_python, os.path.join(here, "static_sass.py"), "--compile-manifest", path,
                    "--target", args.target], check=True)
    print(f"IR{'' if amd else ' and cubins'}: {out_dir}")


if __name__ == "__main__":
    sys.exit(main())

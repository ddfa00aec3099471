"""Static view of the Mosaic GPU decode's (or store's, ``--kernel store``) machine code without a GPU: ptxas
registers, shared memory, the programs that fit on a multiprocessor, and the main loop's SASS.

Instruction count per step is what moved the kernel's time (docs/PERFORMANCE.md, "Eight columns": 913 -> 618
SASS instructions per warp and step, 430 -> 350 us), so a variant can be weighed here before it costs device time.

Setup, once (the CUDA plugin goes into its own environment, the development one stays CPU-only)::

    python3 -m venv /tmp/mgvenv
    /tmp/mgvenv/bin/pip install "jax==0.10.2" "jax-cuda13-plugin==0.10.2" "jax-cuda13-pjrt==0.10.2" absl-py
    pip download --no-deps -d /tmp/nvd nvidia-cuda-nvdisasm && unzip -q -d /tmp/nvd /tmp/nvd/nvidia_cuda_nvdisasm-*.whl

and ptxas (CUDA 13) and gcc on the machine. **The GPU machine's own counts** come from its jax (0.11.2, which needs
Python 3.12: ``pyenv``'s, for one) in a second environment of the same kind, with ``JAX_PLATFORMS=cpu`` (the
plugin's cuDNN check otherwise stops it): its lowering is the device's, and ptxas 13.0 then gives the H200's
register counts exactly (the Mosaic store at ten (preset, N) points of the twentieth session's runs, 128-168,
``docs/data/store_mgpu_registers_cpu_2026-11-30_s21.log``); jax 0.10.2's lowering gives other counts (128 for all
five store presets where the H200 has 128-168). Then, from the repository root::

    /tmp/mgvenv/bin/python -m experiments.mgpu_static_sass --nvdisasm /tmp/nvd/nvidia/cu13/bin/nvdisasm \\
        [--against other_decode_mgpu.py,...] [--points 4bit_nc/128/16/4,k8v4/128/16/4] [--dump /tmp/sass] [--check]

Each point is preset suffix/head_dim/block_size/group (3 sequences of 9 blocks, Hk=2, 2 splits, a 64-page cache), or
preset suffix/head_dim/block_size/group/B/context/splits/pages (Hk=8: a serving shape, splits 0 the default pieces
of :mod:`tqjax.pallas.pieces`; the cache's page count is a
constant of the kernel's scale loads, and ptxas's register count has moved with it, with B and with the splits:
docs/PERFORMANCE.md, "The decode's registers and the cache's size"); store: preset suffix/head_dim/block_size[/N[/Hk
[/pages]]], N tokens of Hk KV heads into a cache of ``pages`` blocks (default ``2 N / block_size + 8``, at least 64,
as ``experiments.store_compare`` builds it); 200 tokens of 2 heads by default: N is a constant of the store kernel,
and ptxas's register count moves with it. ``--check`` exits 1 where a kernel fits fewer programs a multiprocessor
than its module launches or chooses its splits for (:func:`assumed_programs`): the register cliff found before
device time. The last column names the other files whose kernel at that point is the same machine code
(instruction for instruction, addresses aside). How: the kernel is lowered for CUDA (``jax.export``, as the CPU
tests do), and the CUDA plugin's ``MosaicGpuCompile`` runs the same pipeline as on a GPU (Mosaic passes, LLVM NVPTX,
``MOSAIC_GPU_DUMP_PTX``) in a child process, with a stub ``libcuda.so.1`` (built here) that reports one compute
capability 9.0 device and refuses to load the module; the plugin registers its NVPTX target when its client starts
on a GPU, so the child calls the plugin's own ``EnsureLLVMNVPTXTargetIsRegistered`` (not exported: found with
``nm``). Then ``ptxas -v`` and ``nvdisasm`` on the PTX. The main loop is the backward branch around both products'
``HGMMA``s whose range holds no ``EXIT`` (:func:`loop_range`: predicated, or unpredicated after a forward exit test;
it assumes the kernel's ``EXIT`` lies after the loop and the barrier waits' retries after it); its instructions run once per 64-token step in every warp, except a branch taken by one warp
(the page copies). ``--loads`` adds the global loads before the loop with their depth (:func:`load_depths`: the
round trips to memory a program waits for in turn before its first page copy;
docs/data/static_sass_cpu_2026-12-01_s30.log). ``--live`` adds the general registers live at the loop's head and at
its fullest instruction (``nvdisasm -lrm count``): where a variant's registers go
(docs/data/static_sass_cpu_2026-12-01_s29.log).

A proxy, not a measurement: static counts (no stalls; occupancy by registers and shared memory only); with jax
0.10.2 on the CPU, not the GPU machine's lowering (on the H200 the kept decode kernel of the fourteenth session had
150-155 registers and 596 + 77 (warp 0) loop instructions per step in the profile).
"""

from __future__ import annotations

import argparse
import collections
import glob
import inspect
import os
import re
import subprocess
import sys
import tempfile

from experiments.timing import load_versions
from tqjax import TurboQuantConfig

_STUB_LIBCUDA = r"""
#include <stdio.h>
#include <string.h>
typedef int CUresult; typedef int CUdevice; typedef void *CUcontext;
static int ctx;
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "stub libcuda: no GPU"; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { *s = "CUDA_ERROR_STUB"; return 0; }
CUresult cuInit(unsigned f) { return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuDeviceGet(CUdevice *d, int o) { *d = 0; return 0; }
CUresult cuCtxGetDevice(CUdevice *d) { *d = 0; return 0; }
CUresult cuCtxGetCurrent(CUcontext *c) { *c = &ctx; return 0; }
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
  *v = attr == 75 ? 9 : attr == 76 ? 0 : 1;  /* compute capability 9.0 */
  return 0;
}
CUresult cuModuleLoadData(void **m, const void *image) { return 999; }
"""

# The child: lower one kernel and compile it with the CUDA plugin (dumps the PTX, then aborts at the module load).
_CHILD = r"""
import ctypes, importlib.util, io, re, subprocess, sys
import jax, jax.numpy as jnp
from jax.experimental.mosaic.gpu import core as mgpu_core
path, name = sys.argv[1:3]
head_dim, block_size, group, tokens, heads, batch, blocks, splits, pages = map(int, sys.argv[3:12])
kind = sys.argv[12]
sys.path.insert(0, ".")
import tqjax
modules = []
lower = mgpu_core._lower_as_gpu_kernel
def keep(*args, **kwargs):
    out = lower(*args, **kwargs)
    modules.append(out[0])
    return out
mgpu_core._lower_as_gpu_kernel = keep
spec = importlib.util.spec_from_file_location("decode_mgpu_variant", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
if hasattr(mod, "merge_pieces"):  # the pieces' table and merge are Triton kernels: jax 0.11 lowers them beside a GPU
    from tqjax.pallas import pieces
    def _merge(o, lse, info, batch, interpret=False, **kw):
        return pieces.merge_pieces_reference(o, lse, info, batch=batch, **kw)
    def _table(seq_lens, interpret=False, **kw):
        return pieces.piece_table_reference(seq_lens, **kw)
    mod.merge_pieces, mod.piece_table = _merge, _table
if hasattr(mod, "decode_prologue"):  # the query's operands and the table: a Triton kernel too
    mod.decode_prologue = lambda *a, interpret=False, **kw: mod.decode_prologue_reference(*a, **kw)
cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim)
if kind == "store":  # tokens of heads KV heads
    cache = jax.eval_shape(lambda: tqjax.PagedKVCache.allocate(cfg, pages, block_size, heads))
    x = jax.ShapeDtypeStruct((tokens, heads, head_dim), jnp.bfloat16)
    jax.export.export(mod.store_mgpu_jit, platforms=["cuda"])(cache, x, x, jax.ShapeDtypeStruct((tokens,), jnp.int32))
else:
    cache = jax.eval_shape(lambda: tqjax.PagedKVCache.allocate(cfg, pages, block_size, heads))
    q = jax.ShapeDtypeStruct((batch, heads * group, head_dim), jnp.float32)
    f = lambda q, c, t, l: mod.paged_decode_mgpu_jit(q, c, t, l, scale=0.1, softcap=None, num_splits=splits or None,
                                                     stages=2)
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")  # the pieces' merge
    jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[triton])(
        q, cache, jax.ShapeDtypeStruct((batch, blocks), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32))
module = modules[-1]
smem = re.search(r"dynamic_shared_memory_size %c(\d+)_i32", str(module))
print("SMEM", smem.group(1) if smem else -1, flush=True)
with module.context:
    module = mgpu_core._run_serde_pass(module, serialize=True, ir_version=None)
    buf = io.BytesIO()
    module.operation.write_bytecode(buf)
import jax_plugins.xla_cuda13 as cuda_plugin
lib = cuda_plugin._get_library_path()
dll = ctypes.CDLL(lib)
syms = dict(reversed(line.split()[::2]) for line in subprocess.run(["nm", lib], capture_output=True, text=True)
            .stdout.splitlines() if len(line.split()) == 3)
base = ctypes.cast(dll.MosaicGpuCompile, ctypes.c_void_p).value - int(syms["MosaicGpuCompile"], 16)
ctypes.CFUNCTYPE(None)(base + int(syms["_ZN6mosaic3gpu33EnsureLLVMNVPTXTargetIsRegisteredEv"], 16))()
dll.MosaicGpuCompile.argtypes = [ctypes.c_char_p, ctypes.c_int]
dll.MosaicGpuCompile.restype = ctypes.c_void_p
asm = buf.getvalue()
dll.MosaicGpuCompile(asm, len(asm))
"""

# Hopper (sm_90) per multiprocessor: 64K registers, 228 KB of shared memory (1 KB of it reserved per
# block), 64 warps; registers are allocated per warp in units of 256 (8 a thread).
_REGS_PER_SM, _SMEM_PER_SM, _SMEM_PER_BLOCK_RESERVED, _WARPS_PER_SM = 65536, 233472, 1024, 64


def programs_per_sm(registers: int, smem_bytes: int, warps: int = 4) -> int:
    """How many programs (thread blocks of ``warps`` warps) fit on one Hopper multiprocessor at once, limited
    by registers (per thread, rounded up to 8), shared memory (plus the 1 KB reserved per block) and warps."""
    by_regs = _REGS_PER_SM // (32 * -(-registers // 8) * 8) // warps
    by_smem = _SMEM_PER_SM // (smem_bytes + _SMEM_PER_BLOCK_RESERVED)
    return min(by_regs, by_smem, _WARPS_PER_SM // warps)


_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")


def parse_sass(text: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """nvdisasm output -> ([(address, instruction)], {label: address of the next instruction})."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        if m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTR.match(line):
            addr = int(m.group(1), 16)
            for label in pending:
                labels[label] = addr
            pending = []
            instrs.append((addr, m.group(2)))
    return instrs, labels


def loop_range(instrs: list[tuple[int, str]], labels: dict[str, int],
               markers: tuple[str, ...] = ("HGMMA", "tnspA")) -> tuple[int, int]:
    """The main loop's first and last addresses: the range of the backward branch (the loop's back edge:
    predicated, or unpredicated after the loop's exit test) that holds every marker (both products: the score
    product's ``HGMMA``, the value product's ``tnspA`` one) and no ``EXIT``, from the branch target to the branch,
    both included; the largest if several. Out-of-line blocks (a barrier wait's retry) lie after the kernel's
    ``EXIT`` and jump back into the loop: their ranges hold the ``EXIT``, and they are not loops."""
    best: tuple[int, int] | None = None
    for addr, text in instrs:
        m = _BRANCH.search(text)
        if not m or labels.get(m.group(1), addr + 1) > addr:
            continue
        start = labels[m.group(1)]
        body = [t for a, t in instrs if start <= a <= addr]
        if any(opcode(t) == "EXIT" for t in body):
            continue
        if all(any(k in t for t in body) for k in markers) and (best is None or addr - start > best[1] - best[0]):
            best = (start, addr)
    if best is None:
        raise ValueError(f"no loop around {markers}")
    return best


_LIVE = re.compile(_INSTR.pattern + r"\s*//\s*\|\s*(\d*)\s*\|")  # an instruction, then its live registers


def live_registers(text: str, start: int, end: int) -> tuple[int, int, str]:
    """``nvdisasm -lrm count`` output -> the general registers live at ``start`` (the loop's head), the most live at
    any instruction in [start, end], and the first instruction where that many are (``addr: instruction``)."""
    counts = [(int(m.group(1), 16), m.group(2), int(m.group(3) or 0))
              for m in map(_LIVE.match, text.splitlines()) if m]
    loop = [c for c in counts if start <= c[0] <= end]
    if not loop:
        raise ValueError(f"no live-range rows in [{start:#x}, {end:#x}]")
    peak = max(loop, key=lambda c: c[2])
    return loop[0][2], peak[2], f"{peak[0]:#06x}: {peak[1]}"


_REG = re.compile(r"\b(U?[RP])(\d+)(?:\.(64|128))?\b")  # RZ, URZ, PT, UPT: no digits, not matched
_GLOBAL_LOADS = ("LDG", "UTMALDG", "UBLKCP", "LDGSTS")  # global memory read by the instruction (TMA copies too)
# instructions whose first operand is not a register they write (stores, copies, barriers, branches)
_NO_DEST = ("ST", "STG", "STS", "RED", "REDG", "UTMALDG", "UTMASTG", "UBLKCP", "LDGSTS", "BRA", "BAR", "EXIT",
            "WARPSYNC", "MEMBAR", "FENCE", "NOP", "DEPBAR", "CCTL", "ERRBAR", "SYNCS", "WARPGROUP", "CALL", "RET")
_CARRY_OUT = ("IADD3", "LEA", "IMAD", "UIADD3", "ULEA", "ISETP", "UISETP", "FSETP", "HSETP2", "PLOP3", "UPLOP3")


def _regs(operand: str) -> list[str]:
    """The registers an operand names (R2.64: R2, R3; R8 of a 128-bit access: R8..R11), RZ/URZ/PT/UPT aside."""
    return [f"{m.group(1)}{int(m.group(2)) + k}" for m in _REG.finditer(operand)
            for k in range(int(m.group(3) or 32) // 32)]


def load_depths(instrs: list[tuple[int, str]]) -> list[tuple[int, str, int]]:
    """The global loads of a straight-line reading of ``instrs`` with their depth: 1 where the address (for a TMA copy,
    its coordinates) comes from parameters and constants alone, n + 1 where it waits for a value loaded at depth n,
    through registers (data) or a predicated branch on such a value (control: every later instruction). What a kernel
    waits for in turn before its first page copy (the round trips to memory of its start). Approximations: the listing
    read once in address order (a loop's body once), a destination's width from ``.64``/``.128`` in the opcode."""
    depth: dict[str, int] = {}
    floor, out = 0, []
    for addr, text in instrs:
        pred = re.match(r"^@!?(U?P\d)\s+", text)
        op, _, rest = (text[pred.end():] if pred else text).partition(" ")
        name = opcode(text)
        operands = [o.strip() for o in re.split(r",(?![^\[]*\])", rest)] if rest else []
        dests: list[str] = []
        if operands and name not in _NO_DEST:
            dests = _regs(operands[0])
            if name in ("LDG", "LDS", "LD", "LDC", "ULDC") and dests:  # the access's width names the registers
                width = 128 if ".128" in op else 64 if ".64" in op else 32
                base = re.match(r"(U?R)(\d+)", dests[0])
                dests = [f"{base.group(1)}{int(base.group(2)) + k}" for k in range(width // 32)]
            if name in _CARRY_OUT and len(operands) > 1 and re.fullmatch(r"U?P\d", operands[1]):
                dests.append(operands[1])
            srcs = [r for o in operands[1:] for r in _regs(o)]
        else:
            srcs = [r for o in operands for r in _regs(o)]
        if name in ("UTMALDG", "UTMASTG") and operands:  # [URa]: the shared address, the barrier, nD coordinates
            dims = re.search(r"\.(\d)D", op)
            base = re.match(r"\[(UR)(\d+)", operands[0])
            if dims and base:
                srcs += [f"UR{int(base.group(2)) + k}" for k in range(int(dims.group(1)) + 3)]
        if pred:
            srcs.append(pred.group(1))
        level = max([floor] + [depth.get(r, 0) for r in srcs])
        if name in _GLOBAL_LOADS:
            level += 1
            out.append((addr, text, level))
        for r in dests:
            depth[r] = level
        if name == "BRA" and pred:
            floor = max(floor, depth.get(pred.group(1), 0))
    return out


def load_chain(instrs: list[tuple[int, str]], until: int | None = None) -> str:
    """:func:`load_depths` before address ``until`` (the main loop's head), run-length encoded in order: 'LDG d1 x3,
    LDG d2, UTMALDG d2 x2, LDG d3 x4, UTMALDG d4 x8'."""
    runs: list[list] = []
    for addr, text, level in load_depths(instrs):
        if until is not None and addr >= until:
            break
        key = (opcode(text), level)
        if runs and runs[-1][0] == key:
            runs[-1][1] += 1
        else:
            runs.append([key, 1])
    return ", ".join(f"{op} d{level}" + (f" x{n}" if n > 1 else "") for (op, level), n in runs)


def opcode(instruction: str) -> str:
    """'@!P2 BRA `(.L_x_4)' -> 'BRA'; 'IMAD.U32 R49, RZ, RZ, UR13' -> 'IMAD'."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def point_args(point: str, kind: str = "decode") -> tuple:
    """A point (the module docstring) -> (preset suffix, head_dim, block_size, group, tokens, heads, batch, block-table
    width, splits, cache pages), the child's arguments: the store's ``preset/D/block[/N[/Hk[/pages]]]`` (200 tokens
    of 2 heads by default, ``2 N / block + 8`` pages, at least 64), the decode's ``preset/D/block/group`` (3
    sequences of 9 blocks, Hk=2, 2 splits, 64 pages) or ``preset/D/block/group/B/context/splits/pages`` (Hk=8)."""
    fields = point.split("/")
    decode = (3, 9, 2, 64)
    if kind == "store":  # the cache's pages ride in the decode's last field
        preset, head_dim, block_size, tokens, heads, *pages = fields + ["200", "2"][len(fields) - 3:]
        tokens, block_size = int(tokens), int(block_size)
        return (preset, int(head_dim), block_size, 1, tokens, int(heads), *decode[:3],
                int(pages[0]) if pages else max(64, 2 * tokens // block_size + 8))
    preset, head_dim, block_size, group, *rest = fields
    if rest:
        batch, context, splits, pages = map(int, rest)
        decode = (batch, -(-context // int(block_size)), splits, pages)
    return preset, int(head_dim), int(block_size), int(group), 0, 8 if rest else 2, *decode


def analyse(path: str, point: str, env: dict, ptxas: str, nvdisasm: str, work: str, kind: str = "decode",
            live: bool = False) -> dict:
    """One decode_mgpu.py file at one point -> registers, spill stores (bytes), shared memory (bytes), kernel and
    main-loop instruction counts, the loop's opcodes, the kernel's instructions. RuntimeError (with the child's
    error) where the file's kernel does not compile for the point."""
    preset, *args = point_args(point, kind)
    dump = tempfile.mkdtemp(dir=work)
    child_env = dict(env, MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=dump)
    # the child aborts once the stub refuses to load the module, after the PTX is written
    argv = [sys.executable, "-c", _CHILD, path, f"turboquant_{preset}", *map(str, args), kind]
    child = subprocess.run(argv, check=False, env=child_env, capture_output=True, text=True, cwd=os.getcwd())
    smem = re.search(r"^SMEM (-?\d+)$", child.stdout, re.MULTILINE)
    ptx = glob.glob(os.path.join(dump, "*.ptx"))
    if not ptx:
        raise RuntimeError(f"no PTX from {path} {point} (is this the plugin's environment? see the docstring):\n"
                           + child.stderr[-2000:])
    cubin = os.path.join(dump, "kernel.cubin")
    info = subprocess.run([ptxas, "-arch=sm_90a", "-v", "-o", cubin, ptx[0]], check=True, capture_output=True,
                          text=True)
    log = info.stderr + info.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    instrs, labels = parse_sass(sass)
    start, end = loop_range(instrs, labels) if kind == "decode" else (instrs[0][0], instrs[-1][0])  # store: no loop
    loop = [t for a, t in instrs if start <= a <= end]
    smem_bytes = int(smem.group(1)) if smem else -1
    lives = None
    if live:
        lrm = subprocess.run([nvdisasm, "-c", "-lrm", "count", cubin], capture_output=True, text=True, check=True)
        lives = live_registers(lrm.stdout, start, end)
    return {"registers": regs, "spills": spills, "smem": smem_bytes, "total": len(instrs), "loop": len(loop),
            "ops": collections.Counter(opcode(t) for t in loop), "code": tuple(t for _, t in instrs),
            "live": lives, "loads": load_chain(instrs, until=start if kind == "decode" else None)}


def same_code(codes: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """{label: kernel's instructions (no addresses)} -> {label: the other labels whose kernel is the same
    machine code}: a restructured source that compiles to what already ran on the GPU needs no new run."""
    return {a: [b for b in codes if b != a and codes[b] == codes[a]] for a in codes}


def assumed_programs(module, kind: str, preset: str, head_dim: int, group: int = 4) -> int:
    """The programs a multiprocessor that ``module`` (a decode_mgpu.py or store_mgpu.py) launches or chooses its
    splits for at this preset, head_dim and (the decode's) group of query heads: fewer resident run a second
    wave."""
    config = TurboQuantConfig.from_cache_dtype(f"turboquant_{preset}", head_dim)
    if kind == "store":
        if not hasattr(module, "programs_per_core"):  # versions before QJL keys
            return module.PROGRAMS_PER_CORE[head_dim]
        return module.programs_per_core(config)
    if "group" not in inspect.signature(module.programs_per_core).parameters:  # versions before D=64's 5 programs
        return module.programs_per_core(config)
    return module.programs_per_core(config, group)


def program_warps(module, kind: str, head_dim: int) -> int:
    """Warps a program of ``module``: 4 a warpgroup, times the store's ``WARPGROUPS`` (1 where a version has none)."""
    return 4 * (getattr(module, "WARPGROUPS", {}).get(head_dim, 1) if kind == "store" else 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", default="4bit_nc/128/16/4,k8v4/128/16/4",
                    help="comma-separated preset suffix/head_dim/block_size/group")
    ap.add_argument("--against", default="", help="other decode_mgpu.py (store_mgpu.py) files (comma-separated)")
    ap.add_argument("--kernel", choices=("decode", "store"), default="decode",
                    help="decode_mgpu's kernel (points: preset/head_dim/block_size/group) or store_mgpu's "
                         "(points: preset/head_dim/block_size; straight-line code: the 'loop' is the whole kernel)")
    ap.add_argument("--nvdisasm", default="nvdisasm")
    ap.add_argument("--ptxas", default="ptxas")
    ap.add_argument("--cuda-root", default="/usr/local/cuda-13.0", help="for libdevice (MOSAIC_GPU_CUDA_ROOT)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a kernel fits fewer programs a multiprocessor "
                    "than its module assumes (assumed_programs): ptxas's register cliff, before any device time")
    ap.add_argument("--live", action="store_true", help="also print the live general registers at the loop's head "
                    "and at its fullest instruction (nvdisasm -lrm count): where a variant's registers go")
    ap.add_argument("--loads", action="store_true", help="also print the global loads before the loop (the store: "
                    "the whole kernel) with their depth, load_chain: the round trips a program's start waits for")
    ap.add_argument("--dump", default="", help="a folder to write each kernel's SASS into (label_point.sass, one "
                    "instruction a line, no addresses: diff two of them to see what a change moved)")
    args = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="mgpu_static_sass_")
    stub = os.path.join(work, "libcuda.so.1")
    with open(os.path.join(work, "stub.c"), "w") as f:
        f.write(_STUB_LIBCUDA)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", stub, os.path.join(work, "stub.c")], check=True)
    env = dict(os.environ, LD_LIBRARY_PATH=f"{work}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               MOSAIC_GPU_CUDA_ROOT=args.cuda_root)
    files = {"this": f"tqjax/pallas/{args.kernel}_mgpu.py"}
    for path in filter(None, args.against.split(",")):
        files[os.path.basename(path).removesuffix(".py")] = path
    modules = {label: next(iter(load_versions(path, f"static_sass_{label}_").values()))
               for label, path in files.items()}
    rows, short, lives, chains = [], [], [], []
    for point in args.points.split(","):
        codes, first = {}, len(rows)
        for label, path in files.items():
            try:
                r = analyse(path, point, env, args.ptxas, args.nvdisasm, work, args.kernel, args.live)
            except RuntimeError as e:  # a kernel that does not take this point: say so, go on
                lines = [ln for ln in str(e).splitlines() if "Error" in ln] or str(e).splitlines()
                rows.append([point, label, "-", "-", "-", "-", "failed: " + lines[-1].strip()[:200]])
            else:
                codes[label] = r["code"]
                if args.dump:
                    os.makedirs(args.dump, exist_ok=True)
                    with open(os.path.join(args.dump, f"{label}_{point.replace('/', '_')}.sass"), "w") as f:
                        f.write("\n".join(r["code"]) + "\n")
                top = ", ".join(f"{k} {v}" for k, v in r["ops"].most_common(8))
                regs = f"{r['registers']}" + (f" (spills {r['spills']} B)" if r["spills"] else "")
                fields = point_args(point, args.kernel)
                warps = program_warps(modules[label], args.kernel, fields[1])
                fit = programs_per_sm(r["registers"], r["smem"], warps) if r["smem"] > 0 else None
                smem = f"{r['smem']} B, {fit} programs/SM" if fit is not None else "?"
                if args.check:
                    want = assumed_programs(modules[label], args.kernel, fields[0], fields[1], fields[3])
                    if fit is None or fit < want:
                        short.append(f"{point} {label}: {fit} programs fit, {want} assumed")
                        smem += f" (assumes {want}: SHORT)"
                rows.append([point, label, regs, smem, r["loop"], r["total"], top])
                if r["live"]:
                    lives.append([point, label, *r["live"]])
                if args.loads:
                    chains.append([point, label, r["loads"]])
            print("RESULT", *rows[-1], sep=" | ", flush=True)
        same = same_code(codes)
        for row in rows[first:]:
            row.append(", ".join(same.get(row[1], [])) or "-")
    print("point | kernel | registers | shared memory, programs per multiprocessor | loop SASS instructions"
          " | kernel SASS instructions | loop's top opcodes | the same machine code as")
    for row in rows:
        print(" | ".join(map(str, row)))
    if lives:
        print("point | kernel | live at the loop's head | most live in the loop | first at")
        for row in lives:
            print(" | ".join(map(str, row)))
    if chains:
        print("point | kernel | global loads before the loop, in order (dN: waits for N - 1 loads in turn)")
        for row in chains:
            print(" | ".join(map(str, row)))
    if short:
        print("fewer programs a multiprocessor than assumed:", *short, sep="\n  ")
        sys.exit(1)

if __name__ == "__main__":
    main()

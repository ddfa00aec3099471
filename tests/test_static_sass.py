"""experiments.static_sass: the ROCm view's capture (the Pallas kernels lowered for ROCm, no GPU) and its reading of
the AMDGPU assembly's summary (the compile itself needs a separate Triton environment)."""

from __future__ import annotations

import pytest

from experiments.static_sass import amdgpu_usage, capture

# the head of the first block and the summary of a store kernel's assembly, as Triton 3.9's AMD backend wrote it for
# gfx942 (store:turboquant_4bit_nc/32/4)
_ASM = """\
; %bb.6:
\t.file\t1 "/tmp/amd" "k1.ttir"
\t.loc\t1 2 0 prologue_end              ; k1.ttir:2:0
\ts_load_dwordx2 s[2:3], s[0:1], 0x0
\ts_load_dwordx8 s[4:11], s[0:1], 0x8
\ts_waitcnt lgkmcnt(0)
\tv_lshlrev_b32_e32 v1, 2, v0
\tds_write_b32 v1, v2
\tv_mfma_f32_16x16x16_f16 a[0:3], v[4:5], v[6:7], 0
\tv_mfma_f32_16x16x16_f16 a[0:3], v[8:9], v[10:11], a[0:3]
\tglobal_load_dword v3, v1, s[2:3]
\ts_branch .LBB0_0
\t.loc\t1 0 0 is_stmt 0                 ; :0:0
; TotalNumSgprs: 50
; NumVgprs: 118
; NumAgprs: 0
; TotalNumVgprs: 118
; ScratchSize: 0
; MemoryBound: 0
; LDSByteSize: 0 bytes/workgroup (compile time only)
; NumVGPRsForWavesPerEU: 118
; Occupancy: 4
"""


def test_amdgpu_usage_reads_the_summary_and_counts_instructions() -> None:
    assert amdgpu_usage(_ASM) == {
        "NumVgprs": 118, "NumAgprs": 0, "TotalNumVgprs": 118, "TotalNumSgprs": 50, "ScratchSize": 0, "Occupancy": 4,
        "instructions": 9,  # the s_, v_, ds_ and global_ lines; not the directives, labels or comments
        "mfma": {"v_mfma_f32_16x16x16_f16": 2},
    }
    assert amdgpu_usage(_ASM.replace("v_mfma_f32_16x16x16_f16", "v_fma_f32"))["mfma"] == {}


def test_amdgpu_usage_says_which_line_is_missing() -> None:
    with pytest.raises(ValueError, match="Occupancy"):
        amdgpu_usage(_ASM.replace("; Occupancy: 4\n", ""))


def test_capture_for_rocm_calls_the_amd_device_library(tmp_path) -> None:
    """Lowered for ROCm, the store kernel (the portable arithmetic: QJL keys' root corrected by integer steps) calls
    ROCm's device library (``__ocml_*``), not CUDA's (``__nv_*``), which Triton's AMD backend rejects; for CUDA the
    same kernel calls CUDA's."""
    (rocm,) = capture(["store:turboquant_kqjl4v4/16/4"], str(tmp_path), "rocm")
    ir = open(rocm["path"]).read()
    assert "__ocml_sqrt_f32" in ir and "__nv_" not in ir
    (tmp_path / "cuda").mkdir()
    (cuda,) = capture(["store:turboquant_kqjl4v4/16/4"], str(tmp_path / "cuda"), "cuda")
    ir = open(cuda["path"]).read()
    assert "__nv_sqrtf" in ir and "__ocml_" not in ir


def test_capture_for_rocm_refuses_ptx_lookups(tmp_path) -> None:
    with pytest.raises(ValueError, match="CUDA only"):
        capture(["turboquant_4bit_nc/mma_t/64/2/prmt"], str(tmp_path), "rocm")

"""experiments.mgpu_static_sass's reading of nvdisasm output (the compile itself needs the CUDA plugin's
environment: see that module's docstring)."""

from __future__ import annotations

import pytest

from experiments.mgpu_static_sass import (
    assumed_programs,
    live_registers,
    load_chain,
    load_depths,
    loop_range,
    opcode,
    parse_sass,
    point_args,
    program_warps,
    programs_per_sm,
    same_code,
)

# The shape of the decode kernel's listing: a prologue, the loop (both products, a one-warp branch), the
# loop's back edge, an epilogue, and out-of-line barrier-wait retries that branch back into the loop
# (unpredicated) from after it.
LISTING = """
tq_decode_mgpu_mosaic_gpu_kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_7:
        /*0020*/                   LDG.E R24, desc[UR12][R24.64] ;
.L_x_78:
        /*0030*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [UR57], R30 ;
        /*0040*/              @!P2 BRA `(.L_x_4) ;
.L_x_10:
        /*0050*/                   LDS.128 R24, [R48+0x1400] ;
        /*0060*/                   IMAD.U32 R49, RZ, RZ, UR13 ;
        /*0070*/                   HGMMA.64x16x16.F32 R24, R32, gdesc[UR16], RZ, !UPT ;
        /*0080*/               @P2 BRA `(.L_x_6) ;
        /*0090*/                   UTMALDG.4D [UR56], [UR20] ;
.L_x_6:
        /*00a0*/                   HGMMA.64x16x16.F32 R32, gdesc[UR40].tnspA, R32 ;
        /*00b0*/                   FADD R32, R32, R36 ;
        /*00c0*/              @!P2 BRA `(.L_x_7) ;
        /*00d0*/                   EXIT ;
.L_x_4:
        /*00e0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [UR57], R30 ;
        /*00f0*/              @!P2 BRA `(.L_x_4) ;
        /*0100*/                   BRA `(.L_x_10) ;
"""


def test_parse_sass_reads_addresses_and_labels():
    instrs, labels = parse_sass(LISTING)
    assert len(instrs) == 17
    assert instrs[0] == (0x0, "LDC R1, c[0x0][0x28]")
    assert labels == {".L_x_7": 0x20, ".L_x_78": 0x30, ".L_x_10": 0x50, ".L_x_6": 0xA0, ".L_x_4": 0xE0}


def test_main_loop_is_the_back_edge_around_both_products():
    """The predicated back edge 0x00c0 -> .L_x_7, not the retry's unpredicated branch back into the loop
    (a range that holds both products too), nor the retry's own one-instruction loop."""
    instrs, labels = parse_sass(LISTING)
    assert loop_range(instrs, labels) == (0x20, 0xC0)
    loop = [t for a, t in instrs if 0x20 <= a <= 0xC0]
    assert loop[0].startswith("LDG.E") and loop[-1] == "@!P2 BRA `(.L_x_7)"
    assert len(loop) == 11
    with pytest.raises(ValueError, match="no loop"):
        loop_range(*parse_sass(LISTING.replace("tnspA", "")))


# The loop as ptxas also lays it out: the exit test a forward branch at the bottom, the back edge unpredicated.
ROTATED = """
tq_decode_mgpu_mosaic_gpu_kernel:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_11:
        /*0010*/                   HGMMA.64x8x16.F32 R24, R28, gdesc[UR16], RZ, !UPT ;
        /*0020*/              @!P1 BRA `(.L_x_5) ;
.L_x_12:
        /*0030*/                   HGMMA.64x8x16.F32 R24, gdesc[UR28].tnspA, RZ, !UPT ;
        /*0040*/              @!P1 BRA `(.L_x_10) ;
        /*0050*/                   BRA `(.L_x_11) ;
.L_x_10:
        /*0060*/                   EXIT ;
.L_x_5:
        /*0070*/                   SYNCS.PHASECHK.TRANS64 P1, [R3+URZ+0xd000], R0 ;
        /*0080*/              @!P1 BRA `(.L_x_5) ;
        /*0090*/                   BRA `(.L_x_12) ;
"""


def test_main_loop_may_end_in_an_unpredicated_back_edge():
    """The unpredicated back edge 0x0050 -> .L_x_11 after the loop's exit test; the retry's branch back into the
    loop (from after the EXIT) is not the loop."""
    assert loop_range(*parse_sass(ROTATED)) == (0x10, 0x50)


# A program's start: its table column (params only), the sequence's length at the column's b, a TMA copy of the
# query at b, the block table's entries at the length (through uniform registers), a branch on the length, then the
# page copies; loads whose addresses come from elsewhere in between.
START = """
        /*0000*/                   LDC.64 R116, c[0x0][0x210] ;
        /*0010*/                   LDG.E R2, desc[UR56][R116.64] ;
        /*0020*/                   LDG.E R5, desc[UR56][R116.64+0x80] ;
        /*0030*/                   R2UR UR52, R2 ;
        /*0040*/                   IMAD.WIDE R2, R2, 0x4, R8 ;
        /*0050*/                   LDG.E R94, desc[UR56][R2.64] ;
        /*0060*/                   USHF.L.U32 UR9, UR52, 0x7, URZ ;
        /*0070*/                   UTMALDG.3D [UR8], [UR6] ;
        /*0080*/                   IADD3 R7, R94, 0xf, RZ ;
        /*0090*/                   LEA R10, P0, R7, R20, 0x2 ;
        /*00a0*/                   LDG.E.128 R12, desc[UR56][R10.64] ;
        /*00b0*/                   ISETP.GE.AND P1, PT, R5, 0x1, PT ;
        /*00c0*/              @!P1 BRA `(.L_x_0) ;
        /*00d0*/                   LDG.E R30, desc[UR56][R40.64] ;
        /*00e0*/                   R2UR UR28, R15 ;
        /*00f0*/                   UTMALDG.4D [UR24], [UR14] ;
        /*0100*/                   LDG.E R31, desc[UR56][R41.64] ;
"""


def test_load_depths_follow_data_and_branches():
    """Depth 1 from parameters; the length at b (data: 2); the query's copy whose coordinates hold b (2); the block
    table at the length, through IADD3/LEA (3); after a branch on a depth-1 value, a load of unrelated address (2);
    the page copy whose coordinates hold a block-table entry (4); a 128-bit load's four registers all carry its depth;
    the chain run-length encoded, cut at an address."""
    depths = [(a, d) for a, _, d in load_depths(parse_sass(START)[0])]
    assert depths == [(0x10, 1), (0x20, 1), (0x50, 2), (0x70, 2), (0xA0, 3), (0xD0, 2), (0xF0, 4), (0x100, 2)]
    assert load_chain(parse_sass(START)[0]) == "LDG d1 x2, LDG d2, UTMALDG d2, LDG d3, LDG d2, UTMALDG d4, LDG d2"
    assert load_chain(parse_sass(START)[0], until=0xA0) == "LDG d1 x2, LDG d2, UTMALDG d2"


def test_opcode_drops_predicates_and_modifiers():
    assert opcode("@!P2 BRA `(.L_x_4)") == "BRA"
    assert opcode("IMAD.U32 R49, RZ, RZ, UR13") == "IMAD"
    assert opcode("@UP0 UIADD3 UR4, UR4, 0x1, URZ") == "UIADD3"


def test_same_code_pairs_identical_listings_only():
    a = tuple(t for _, t in parse_sass(LISTING)[0])
    b = tuple(t for _, t in parse_sass(LISTING.replace("FADD R32, R32, R36", "FADD R32, R36, R32"))[0])
    assert same_code({"this": a, "landed": a, "other": b}) == {"this": ["landed"], "landed": ["this"], "other": []}


def test_programs_per_sm_by_registers_shared_memory_and_warps():
    """The fourteenth session's profile: 155 registers (160 allocated), 66.6 KB: 3 programs; the limits each
    bind in turn."""
    assert programs_per_sm(155, 66_600) == 3
    assert programs_per_sm(168, 40_000) == 3  # 12 warps of 168 (allocated 168) registers
    assert programs_per_sm(128, 50_000) == 4  # 16 warps of 128
    assert programs_per_sm(129, 50_000) == 3  # 136 allocated: 15 warps
    assert programs_per_sm(128, 57_000) == 4 and programs_per_sm(128, 57_400) == 3  # 228 KB / (smem + 1 KB)
    assert programs_per_sm(102, 10_000) == 4  # 104 allocated: 19 warps (102 would fit 20)
    assert programs_per_sm(32, 1_000) == 16  # 64 warps


def test_point_args() -> None:
    assert point_args("4bit_nc/128/16/4") == ("4bit_nc", 128, 16, 4, 0, 2, 3, 9, 2, 64)
    assert point_args("3bit_nc/128/32/8/32/16384/2/40000") == ("3bit_nc", 128, 32, 8, 0, 8, 32, 512, 2, 40000)
    assert point_args("3bit_nc/128/16/4/1/100/64/7") == ("3bit_nc", 128, 16, 4, 0, 8, 1, 7, 64, 7)  # ceil(100 / 16)
    assert point_args("k3p5v4/128/16", "store") == ("k3p5v4", 128, 16, 1, 200, 2, 3, 9, 2, 64)
    assert point_args("k3p5v4/64/16/4096", "store")[4:6] == (4096, 2)
    assert point_args("k3p5v4/64/16/4096/8", "store")[4:] == (4096, 8, 3, 9, 2, 520)  # 2 N / 16 + 8 pages
    assert point_args("k3p5v4/64/16/32/8/40000", "store")[4:] == (32, 8, 3, 9, 2, 40000)


def test_assumed_programs() -> None:
    from tqjax.pallas import decode_mgpu, store_mgpu

    assert assumed_programs(store_mgpu, "store", "4bit_nc", 128) == store_mgpu.PROGRAMS_PER_CORE[128] == 1
    assert program_warps(store_mgpu, "store", 128) == 16  # 4 warpgroups share the +-1 matrix
    assert assumed_programs(store_mgpu, "store", "3bit_nc", 64) == 5 and program_warps(store_mgpu, "store", 64) == 4
    assert program_warps(decode_mgpu, "decode", 128) == 4
    assert assumed_programs(decode_mgpu, "decode", "4bit_nc", 128) == 4
    assert assumed_programs(decode_mgpu, "decode", "kqjl4v4", 128) == 3  # the QJL query's shared memory
    assert assumed_programs(decode_mgpu, "decode", "3bit_nc", 256) == 2
    assert assumed_programs(decode_mgpu, "decode", "3bit_nc", 64, 4) == 5  # the narrow form at D=64
    assert assumed_programs(decode_mgpu, "decode", "3bit_nc", 64, 8) == 4


# nvdisasm -lrm count's form: each instruction followed by the live general, predicate, uniform and uniform
# predicate registers (a blank: none)
LIVE_LISTING = """
        .global         tq_decode_mgpu_mosaic_gpu_kernel                             // |       |        |        |
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                    // |    1  |        |    3   |
        /*0010*/                   S2R R0, SR_TID.X ;                                        // |    2  |        |    3   |
        /*0020*/                   LDG.E R24, desc[UR12][R24.64] ;                           // |   70  |   1    |    9   |
        /*0030*/                   PRMT R35, R35, R32, 0xa1a8abad ;                          // |  121  |   1    |    9   |
        /*0040*/                   PRMT R36, R35, R33, 0xa1a8abad ;                          // |  121  |   1    |    9   |
        /*0050*/                   HGMMA.64x16x16.F32 R24, R32, gdesc[UR16], RZ, !UPT ;      // |   92  |   1    |   12   |
        /*0060*/               @!P2 BRA `(.L_x_7) ;                                          // |   75  |   1    |    9   |
        /*0070*/                   EXIT ;                                                    // |       |        |        |
"""


def test_live_registers_reads_the_loops_head_and_fullest_instruction():
    """The count at the range's first instruction, the largest inside the range (the first of equal ones), the
    rows outside the range ignored (the kernel's start, the exit's blank count)."""
    head, peak, at = live_registers(LIVE_LISTING, 0x20, 0x60)
    assert (head, peak) == (70, 121)
    assert at == "0x0030: PRMT R35, R35, R32, 0xa1a8abad"
    assert live_registers(LIVE_LISTING, 0x50, 0x70)[:2] == (92, 92)
    with pytest.raises(ValueError, match="no live-range rows"):
        live_registers(LIVE_LISTING, 0x100, 0x200)

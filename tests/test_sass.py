"""The SASS report (python -m tritonfp8.aot --sass-report): its SASS parsing and roofline
model on hand-written code, and the command itself on a few kernels, so that it cannot rot.

The compiles run in a subprocess: this test process has Triton in interpreter mode."""
import json
import subprocess
import sys

import pytest
from conftest import compiled_env

from tritonfp8 import sass

# cuobjdump's layout: an address comment, an optional predicate, the opcode, operands.
_CODE = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                      /* 0x0 */
        /*0010*/                   S2R R0, SR_TID.X ;                          /* 0x0 */
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;            /* 0x0 */
        /*0030*/                   NOP ;                                       /* 0x0 */
        /*0040*/                   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR16], R24 ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], R88, gsb0 ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0070*/                   FADD R24, R24, R40 ;
        /*0080*/              @!P1 BRA 0x40 ;
        /*0090*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00a0*/                   SHFL.BFLY PT, R5, R20, 0x1, 0x1f ;
        /*00b0*/                   STG.E.64 desc[UR10][R6.64], R4 ;
        /*00c0*/              @!P0 BRA 0x20 ;
        /*00d0*/                   SYNCS.PHASECHK.TRANS64 P1, [UR4], R3 ;
        /*00e0*/              @!P1 BRA 0xd0 ;
        /*00f0*/                   EXIT ;
        /*0100*/                   BRA 0x100;
"""


def test_parse_sass_reads_opcodes_with_shapes_and_drops_nops():
    code = sass.parse_sass(_CODE)
    assert len(code) == 16  # 17 lines, one NOP
    assert code[3].opcode == "QGMMA.64x128x32.F32.E4M3.E4M3" and code[3].address == 0x40
    assert code[7].predicate == "@!P1" and code[7].base == "BRA"


def test_loops_and_the_steady_state_loop():
    code = sass.parse_sass(_CODE)
    # backward branches only: the branch to itself at the end is a trap, not a loop
    assert sorted(sass.loops(code)) == [(0x20, 0xC0), (0x40, 0x80), (0xD0, 0xE0)]
    # the innermost loop that holds an MMA, not the outer tile loop nor the barrier retry loop
    assert sass.steady_state_loop(code, sass._MMA) == (0x40, 0x80)
    # the loop that stores: the outer one here
    assert sass.steady_state_loop(code, sass._STORE) == (0x20, 0xC0)


def test_main_path_of_a_kernel_without_loops_stops_at_its_exit():
    code = sass.parse_sass("""
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/               @P0 EXIT ;
        /*0020*/                   FADD R2, R2, R3 ;
        /*0030*/                   EXIT ;
        /*0040*/                   MUFU.RCP R4, R5 ;
        /*0050*/                   RET.REL.NODEC R2 0x0 ;
        /*0060*/                   BRA 0x60;
""")
    assert [i.address for i in sass.main_path(code)] == [0x00, 0x10, 0x20, 0x30]


def test_split_paths_keeps_one_side_of_a_diamond_and_every_skip():
    code = sass.parse_sass("""
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   FSETP.GEU.AND P3, PT, R20, 464, PT ;
        /*0020*/               @P3 BRA 0x70 ;
        /*0030*/                   F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C R6, R5, R4, RZ ;
        /*0040*/              @!P2 BRA 0x60 ;
        /*0050*/                   STG.E.128 desc[UR4][R8.64], R4 ;
        /*0060*/                   BRA 0xc0 ;
        /*0070*/                   F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C R6, R5, R4, RZ ;
        /*0080*/                   PRMT R7, R6, 0x7770, RZ ;
        /*0090*/                   ISETP.GT.AND P4, PT, R7, 0x7e, PT ;
        /*00a0*/                   SEL R7, R7, 0x7e, !P4 ;
        /*00b0*/                   STG.E.128 desc[UR4][R8.64], R4 ;
        /*00c0*/                   IADD3 R2, R2, 0x10, RZ ;
        /*00d0*/              @P0 BRA 0x0 ;
""")
    fast = [i.address for i in sass.split_paths(code)]
    slow = [i.address for i in sass.split_paths(code, shorter=False)]
    # the shorter side (bare conversion, with its masked-store skip kept whole), then the merge point
    assert fast == [0x0, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0xC0, 0xD0]
    assert slow == [0x0, 0x10, 0x20, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0]
    # a branch that only skips code (no unconditional branch before its target): nothing is cut
    skip_only = sass.parse_sass("""
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/              @!P2 BRA 0x40 ;
        /*0020*/                   F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C R6, R5, R4, RZ ;
        /*0030*/                   STG.E.128 desc[UR4][R8.64], R4 ;
        /*0040*/                   IADD3 R2, R2, 0x10, RZ ;
        /*0050*/              @P0 BRA 0x0 ;
""")
    assert sass.split_paths(skip_only) == sass.split_paths(skip_only, shorter=False) == skip_only


def test_mix_wait_depth_and_mma_flops():
    code = sass.parse_sass(_CODE)
    body = [i for i in code if 0x40 <= i.address <= 0x80]
    counts = sass.mix(body)
    assert counts["mma"] == 2 and counts["fp32"] == 1 and counts["total"] == 5
    assert sass.wait_depth(body) == 1 and sass.wait_depth(code[:3]) is None
    # 8 warps = 2 warpgroups; the bf16 wgmma counts double (half the fp8 rate)
    assert sass.mma_flops(body, 8) == 2 * (2 * 64 * 128 * 32 + 2 * (2 * 64 * 64 * 16))
    whole = sass.mix(code)
    assert (whole["bar_sync"], whole["shfl"], whole["global_load"], whole["global_store"]) == (1, 1, 1, 1)


def test_occupancy_limits():
    # 255 registers x 8 warps fill the register file: one CTA
    assert sass.occupancy(255, 8, 131104) == 1
    # 128 registers x 4 warps: 4 CTAs by registers (16 by warps)
    assert sass.occupancy(128, 4, 0) == 4
    # shared memory limits: 100 KB per CTA -> 2
    assert sass.occupancy(32, 4, 100 * 1024) == 2


# A machine with round numbers: 1 SM, 4 schedulers at 1 Hz, 1000 fp8 flops per second.
_TOY = dict(sass.H200, sms=1, schedulers=4, clock_hz=1.0, fp8_flops=1000.0, hbm_bytes_per_s=64.0)


def test_mma_model_serializes_a_zero_wait_and_overlaps_a_deeper_one():
    unit = sass.Unit("gemm", per_thread=1, mma_flops=4000.0)  # 4 cycles of MMA per K-step
    loop_mix = {"total": 10, "mma": 2}  # 8 other instructions x 4 warps / 4 schedulers = 8 cycles
    serial = sass.predict(unit, loop_mix, 4, 1, 0, _TOY)
    overlapped = sass.predict(unit, loop_mix, 4, 1, 1, _TOY)
    two_ctas = sass.predict(unit, loop_mix, 4, 2, 0, _TOY)
    assert (serial["mma_cycles"], serial["issue_cycles"]) == (4.0, 8.0)
    assert serial["fraction_of_fp8_peak"] == pytest.approx(4 / 12, abs=1e-3)
    assert overlapped["fraction_of_fp8_peak"] == pytest.approx(4 / 8, abs=1e-3)
    assert two_ctas["fraction_of_fp8_peak"] == pytest.approx(8 / 16, abs=1e-3)


def test_memory_model_is_the_smaller_of_issue_and_bandwidth():
    # issue: 32 * 1 * 4 * 1 / ipe elements/s; memory: 64 / 4 = 16 elements/s
    unit = sass.Unit("cast", per_thread=2, bytes_per_element=4)
    fast = sass.predict(unit, {"total": 8, "mma": 0}, 4, 1, None, _TOY)  # ipe 4: 32 elt/s, memory-bound
    slow = sass.predict(unit, {"total": 32, "mma": 0}, 4, 1, None, _TOY)  # ipe 16: 8 elt/s
    assert fast["instructions_per_element"] == 4 and fast["bound"] == "memory" and fast["fraction_of_hbm"] == 1.0
    assert slow["bound"] == "issue" and slow["fraction_of_hbm"] == 0.5


_FILTER = "|".join(["cast e4m3 tensor nearest bf16", "cast e4m3 none stochastic bf16", "cast e4m3 1x128 nearest bf16",
                    "tma 64x128x128/g8/w4/s4 e4m3xe4m3 a:tensor", "attention_fwd[D=128,bf16,",
                    "optimizer adamw_bf16_bf16_sr", "-> bf16 fast-acc"])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sass")
    proc = subprocess.run(
        [sys.executable, "-m", "tritonfp8.aot", "--sass-report", str(out), "--filter", _FILTER, "--jobs", "2"],
        env=compiled_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "sass_report.json").read_text()), (out / "sass_report.md").read_text()


def _row(rows, name, target="sm_90"):
    found = [r for r in rows if r["name"].startswith(name) and r["target"] == target]
    assert len(found) == 1, (name, target, [r["name"] for r in rows])
    return found[0]


def test_report_compiles_the_chosen_rows_and_their_references(report):
    rep, md = report
    names = {r["name"] for r in rep["rows"]}
    # the 7 chosen rows and their 6 references (the optimizer has none)
    assert len(names) == 13, sorted(names)
    for ref in ("ref hw cast e4m3 bf16", "ref philox4 cast e4m3 bf16", "ref gemm no promotion 64x128x128/g8/w4/s4",
                "ref attention fwd hw P D=128", "ref hw block cast e4m3 1x128 bf16"):
        assert ref in names, ref
    assert not rep["failed"] and all(r["ok"] for r in rep["rows"])
    # products and attention also for sm_100, casts for sm_90 only
    assert _row(rep["rows"], "scaled_mm[tma 64x128x128", "sm_100")["parts"][0]["mma_instructions"]
    assert not [r for r in rep["rows"] if r["family"] == "cast" and r["target"] != "sm_90"]
    for r in rep["rows"]:
        assert r["name"] in md


def test_cast_rows(report):
    rows = report[0]["rows"]
    ref = _row(rows, "ref hw cast e4m3 bf16")["parts"][0]
    assert ref["loop_mix"]["convert"] > 0  # the hardware conversion (F2FP) is what the reference is
    tensor = _row(rows, "cast e4m3 tensor nearest bf16")
    amax, cast = tensor["parts"]
    assert amax["kernel"] == "_amax_kernel" and amax["prepass"] and not cast["prepass"]
    for p in (cast, ref):  # instructions per element are the loop's over its elements per thread
        assert p["instructions_per_element"] == pytest.approx(p["loop_mix"]["total"] / p["per_thread"], abs=0.01)
        assert p["spill_bytes"] == 0 and p["registers"] > 0
    # the bf16 -> fp8 cast moves 3 bytes per element, its amax pre-pass 2 more
    assert (cast["bytes_per_element"], amax["bytes_per_element"]) == (3, 2)
    assert tensor["ratio_to_reference"] == pytest.approx(cast["instructions_per_element"]
                                                         / ref["instructions_per_element"], abs=0.01)
    assert tensor["check"]["goal"] == "ipe_ratio<=1.3"
    assert tensor["check"]["holds"] == (tensor["ratio_to_reference"] <= 1.3)
    sr = _row(rows, "cast e4m3 none stochastic bf16")
    assert sr["check"]["goal"] == "ipe<=45"
    assert sr["check"]["value"] == pytest.approx(sr["parts"][0]["instructions_per_element"], abs=0.01)


def _count(part, prefix):
    return sum(n for op, n in part["loop_opcodes"].items() if op.startswith(prefix))


def test_the_kernels_compiled_code_has_the_expected_instructions(report):
    """What issue 11's kernel changes put into the sm_90 machine code: nearest casts and
    attention's P through the hardware conversion (F2FP.SATFINITE), stochastic casts on the
    integer path with one Philox call per 4 elements (Philox4x32-10: 10 rounds of 2 high
    products per call, so about 5 IMAD.HI per element; one call per element would be 20)."""
    rows = report[0]["rows"]
    nearest = _row(rows, "cast e4m3 tensor nearest bf16")["parts"][1]
    stochastic = _row(rows, "cast e4m3 none stochastic bf16")["parts"][0]
    attention = _row(rows, "attention_fwd[D=128,bf16,hwP]")["parts"][0]
    # (no Philox: the odd IMAD.HI of address arithmetic, against about 5 per element for Philox)
    assert _count(nearest, "F2FP.SATFINITE.E4M3") > 0 and _count(nearest, "IMAD.HI") / nearest["per_thread"] < 0.5
    # its chunks without overflow, Inf or NaN store the bare conversion: no fix-ups on that path, which
    # is therefore shorter than the one with them (a kernel without the split has no slow path to report)
    assert nearest["slow_path_instructions_per_element"] > nearest["instructions_per_element"]
    assert _count(nearest, "PRMT") / nearest["per_thread"] <= 1.5
    # a 1 x 128 block cast: the same split; its reference computes the groups' scales (exact divisions) too
    block = _row(rows, "cast e4m3 1x128 nearest bf16")
    block_ref = _row(rows, "ref hw block cast e4m3 1x128 bf16")
    assert block["reference"] == block_ref["name"] and _count(block["parts"][0], "F2FP.SATFINITE.E4M3") > 0
    assert block["parts"][0]["slow_path_instructions_per_element"] > block["parts"][0]["instructions_per_element"]
    assert _count(block_ref["parts"][0], "FCHK") > 0  # div.rn's range check: the exact division
    assert _count(stochastic, "F2FP") == 0
    assert _count(stochastic, "IMAD.HI") / stochastic["per_thread"] <= 6
    assert _count(attention, "F2FP.SATFINITE.E4M3") > 0


def test_gemm_and_attention_rows(report):
    rows = report[0]["rows"]
    gemm = _row(rows, "scaled_mm[tma 64x128x128")
    ref = _row(rows, "ref gemm no promotion 64x128x128")
    for r in (gemm, ref):
        p = r["parts"][0]
        assert p["tma"] and any(o.startswith("QGMMA") and "E4M3" in o for o in p["mma_instructions"])
        assert isinstance(p["wait_depth"], int)
        # one K-step of a 64 x 128 x 128 tile: 2 * 64 * 128 * 128 flops in the wgmmas of one warpgroup
        unit = sass.Unit("gemm", 1, mma_flops=2 * 64 * 128 * 128)
        again = sass.predict(unit, p["loop_mix"], p["num_warps"], p["ctas_per_sm"], p["wait_depth"])
        assert again["predicted_tflops"] == p["predicted_tflops"]
    # the reference accumulates without promotion: its wgmmas stay in flight across the wait
    assert ref["parts"][0]["wait_depth"] >= 1
    assert gemm["ratio_to_reference"] == pytest.approx(
        gemm["parts"][0]["predicted_tflops"] / ref["parts"][0]["predicted_tflops"], abs=0.01)
    # the recipe's fast accumulation: no promotion, so the wgmma stays in flight like the reference's
    fast = _row(rows, "scaled_mm[tma 128x128x128/g8/w8/s4 e4m3xe4m3 a:tensor b:tensor -> bf16 fast-acc]")
    promoted_ref = _row(rows, "ref gemm no promotion 128x128x128")
    assert fast["parts"][0]["wait_depth"] >= 1 and fast["check"]["holds"]
    assert fast["parts"][0]["loop_mix"]["total"] <= promoted_ref["parts"][0]["loop_mix"]["total"] + 8
    attn = _row(rows, "attention_fwd[D=128,bf16,hwP]")
    aref = _row(rows, "ref attention fwd hw P D=128")
    assert attn["check"]["goal"] == "non_mma_ratio<=2"
    assert attn["ratio_to_reference"] == pytest.approx(
        attn["parts"][0]["non_mma_per_score"] / aref["parts"][0]["non_mma_per_score"], abs=0.01)
    opt = _row(rows, "optimizer adamw_bf16_bf16_sr")["parts"][0]
    assert opt["loop"].startswith("none") and opt["bytes_per_element"] == 14

"""The SASS report: each kernel's sm_90 machine code set beside a minimal reference kernel.

``python -m tritonfp8.aot --sass-report DIR`` compiles every shipped kernel configuration
(and the reference kernels of :mod:`tritonfp8.ops.baseline`) as Triton's JIT would
compile it for an H200 (sm_90; the products and attention also for sm_100), reads the
cubin with ``cuobjdump`` and writes ``DIR/sass_report.json`` and ``DIR/sass_report.md``.

Per kernel: registers, spills (STACK), shared memory, occupancy, the steady-state loop
(the innermost loop holding an MMA, or the loop that stores the casts' outputs; the
whole kernel when it has no loop) and its instruction mix, the MMA instruction and
the wgmma wait depth, TMA use, and a roofline prediction from :data:`H200` by the
model of :func:`predict`. Every figure is a prediction until a GPU measures it
(``perf/gpu_check.sh``).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional

# The machine the predictions are for (datasheet, dense): 132 SMs of 4 schedulers issuing
# one warp-instruction per clock each. The clock is the one at which the datasheet's 1979
# TFLOP/s is 132 SMs x 8192 fp8 flops per clock (1.83 GHz; the boost clock, 1.98 GHz, would
# make the tensor cores look 8% slower than the schedulers).
H200 = dict(name="NVIDIA H200 (model)", sms=132, schedulers=4, clock_hz=1.83e9, hbm_bytes_per_s=4.8e12,
            fp8_flops=1979e12, registers_per_sm=65536, max_warps_per_sm=64, max_ctas_per_sm=32,
            shared_per_sm=228 * 1024, reserved_shared_per_cta=1024)

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_MMA = re.compile(r"^(HGMMA|QGMMA|IGMMA|HMMA|QMMA|IMMA|UTC\w*MMA)")
_STORE = re.compile(r"^(STG|ST\.|STS|UTMASTG|UBLKCP)")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. "LDG.E.128"
    operands: str
    predicate: str = ""

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of ``cuobjdump --dump-sass`` output (one kernel), NOPs left out."""
    out = []
    for m in _LINE.finditer(text):
        addr, pred, opcode, operands = m.groups()
        if opcode == "NOP":
            continue
        out.append(Instruction(int(addr, 16), opcode, operands.strip(), (pred or "").strip()))
    return out


def branch_target(ins: Instruction) -> Optional[int]:
    """The address a BRA jumps to (None for other instructions)."""
    if ins.base != "BRA":
        return None
    m = re.search(r"0x([0-9a-f]+)\s*$", ins.operands)
    return int(m.group(1), 16) if m else None


def loops(code: list[Instruction]) -> list[tuple[int, int]]:
    """(first, last) address of every loop: a branch back to an earlier address closes one."""
    found = []
    for ins in code:
        target = branch_target(ins)
        if target is not None and target < ins.address:
            found.append((target, ins.address))
    return found


def split_paths(body: list[Instruction], shorter: bool = True) -> list[Instruction]:
    """``body`` (a loop's instructions, address order) with every if/else diamond cut to one side.

    A diamond is a predicated forward branch whose target follows an unconditional branch
    to a later merge point inside ``body``: the code between the two branches is one side,
    the code from the target to the merge point the other. ``shorter``: keep the side with
    fewer instructions (a cast's chunk path without fix-ups), else the longer. Branches that
    only skip code (masked stores) are no diamonds and keep everything.
    """
    index = {ins.address: i for i, ins in enumerate(body)}
    out, i = [], 0
    while i < len(body):
        ins = body[i]
        target = branch_target(ins)
        k = index.get(target) if (target is not None and ins.predicate and target > ins.address) else None
        if k is not None and k > i + 1 and not body[k - 1].predicate:
            merge = branch_target(body[k - 1])
            end = index.get(merge) if merge is not None and merge > target else None
            if end is not None:
                sides = sorted((body[i + 1:k], body[k:end]), key=len)
                out.append(ins)
                out += split_paths(sides[0] if shorter else sides[1], shorter)
                i = end
                continue
        out.append(ins)
        i += 1
    return out


def steady_state_loop(code: list[Instruction], anchor: re.Pattern) -> Optional[tuple[int, int]]:
    """The first (in address order) innermost loop that holds an instruction matching ``anchor``."""
    held = [(a, b) for a, b in loops(code) if any(a <= i.address <= b and anchor.match(i.opcode) for i in code)]
    inner = _innermost(held)
    return min(inner) if inner else None


def _histogram(code: list[Instruction]) -> dict:
    """Opcode (with modifiers) -> count, most frequent first."""
    return dict(Counter(ins.opcode for ins in code).most_common())


def mix(code: list[Instruction]) -> dict:
    """Instruction counts of a stretch of code, by class."""
    classes = {
        "mma": lambda o: bool(_MMA.match(o)),
        "bar_sync": lambda o: o.startswith("BAR"),
        "shfl": lambda o: o.startswith("SHFL"),
        "global_load": lambda o: o.startswith("LDG"),
        "global_store": lambda o: o.startswith("STG"),
        "shared": lambda o: o.split(".")[0] in ("LDS", "STS", "LDSM", "STSM"),
        "tma": lambda o: o.startswith("UTMA") or o.startswith("UBLKCP"),
        "convert": lambda o: o.split(".")[0] in ("F2F", "F2FP", "F2I", "I2F", "I2FP"),
        "atomic": lambda o: o.split(".")[0] in ("ATOM", "ATOMG", "RED", "REDG", "REDUX"),
        "fp32": lambda o: o.split(".")[0] in ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "MUFU", "FCHK"),
        "integer": lambda o: o.split(".")[0] in ("IMAD", "IADD3", "LOP3", "SHF", "ISETP", "SEL", "PRMT", "LEA",
                                                 "IMNMX", "VIMNMX", "IABS", "FLO", "POPC", "IMUL", "BMSK", "SGXT"),
    }
    counts = {name: 0 for name in classes}
    for ins in code:
        for name, test in classes.items():
            if test(ins.opcode):
                counts[name] += 1
    counts["total"] = len(code)
    return counts


def wait_depth(code: list[Instruction]) -> Optional[int]:
    """The smallest N of the wgmma waits (``WARPGROUP.DEPBAR.LE gsb0, N``) in ``code``; None without one."""
    depths = [int(m.group(1), 16) for i in code if i.opcode.startswith("WARPGROUP.DEPBAR")
              for m in [re.search(r"0x([0-9a-f]+)", i.operands)] if m]
    return min(depths) if depths else None


def occupancy(registers: int, num_warps: int, shared_bytes: int, machine: dict = H200) -> int:
    """CTAs per SM: the least of the register, warp, CTA and shared-memory limits."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = machine["registers_per_sm"] // (regs_per_warp * num_warps)
    by_warps = machine["max_warps_per_sm"] // num_warps
    by_shared = machine["shared_per_sm"] // (shared_bytes + machine["reserved_shared_per_cta"])
    return max(0, min(by_regs, by_warps, machine["max_ctas_per_sm"], by_shared))


@dataclass
class Unit:
    """What one steady-state iteration of a kernel does, per thread and per CTA.

    family: "cast", "optimizer" (memory-bound element-wise), "gemm" or "attention".
    per_thread: elements (casts, optimizer) or scores (attention) per thread per
    iteration; 1 for a GEMM's K-step. bytes_per_element: HBM traffic per element.
    mma_flops: tensor-core flops per CTA per iteration (GEMM, attention; read off
    the SASS by :func:`analyze`).
    """

    family: str
    per_thread: float
    bytes_per_element: float = 0.0
    mma_flops: float = 0.0
    per_thread_kernel: float = 0.0  # elements per thread of a whole program (kernels without a loop)


def predict(unit: Unit, loop_mix: dict, num_warps: int, ctas_per_sm: int, depth: Optional[int],
            machine: dict = H200) -> dict:
    """Roofline prediction of a kernel from its steady-state instruction counts.

    Memory-bound kernels (casts, optimizer): a thread's ``ipe`` instructions per element
    are issued by 4 schedulers per SM at one warp-instruction per clock, so the machine
    issues 32 * SMs * 4 * clock / ipe elements per second; HBM moves bandwidth /
    bytes_per_element. Predicted: the smaller, as a fraction of the HBM roofline.
    Latency hiding is assumed perfect (enough warps resident).

    MMA kernels (GEMM, attention): per iteration a CTA spends mma = flops / (fp8 peak per
    SM per clock) cycles in the tensor cores and issue = non-MMA instructions * warps / 4
    cycles issuing the rest. With a wgmma wait depth of 0 the two run one after the other
    within a CTA (mma + issue); deeper waits overlap them (max). c CTAs per SM share the
    tensor cores and the schedulers: time = max(c * mma, c * issue, chain); predicted
    throughput = c * mma / time of the fp8 peak. Memory traffic is not modelled (large
    problems are compute-bound).
    """
    total = loop_mix["total"]
    if unit.family in ("cast", "optimizer"):
        ipe = total / unit.per_thread
        issue_rate = 32 * machine["sms"] * machine["schedulers"] * machine["clock_hz"] / ipe
        memory_rate = machine["hbm_bytes_per_s"] / unit.bytes_per_element
        fraction = min(1.0, issue_rate / memory_rate)
        return dict(instructions_per_element=round(ipe, 2), bound="memory" if fraction >= 1.0 else "issue",
                    fraction_of_hbm=round(fraction, 3),
                    predicted_gb_per_s=round(fraction * machine["hbm_bytes_per_s"] / 1e9, 1))
    non_mma = total - loop_mix["mma"]
    mma_cycles = unit.mma_flops / (machine["fp8_flops"] / (machine["sms"] * machine["clock_hz"]))
    issue_cycles = non_mma * num_warps / machine["schedulers"]
    chain = mma_cycles + issue_cycles if depth == 0 else max(mma_cycles, issue_cycles)
    c = max(1, ctas_per_sm)
    time = max(c * mma_cycles, c * issue_cycles, chain)
    fraction = c * mma_cycles / time
    out = dict(non_mma_per_iteration=non_mma, mma_cycles=round(mma_cycles, 1), issue_cycles=round(issue_cycles, 1),
               fraction_of_fp8_peak=round(fraction, 3), predicted_tflops=round(fraction * machine["fp8_flops"] / 1e12))
    if unit.family == "attention":
        out["non_mma_per_score"] = round(non_mma / unit.per_thread, 2)
    return out


def main_path(code: list[Instruction]) -> list[Instruction]:
    """A kernel without loops up to its first unpredicated EXIT: the code after it (slow paths
    of division and square root, the trailing self-branch) runs rarely or never."""
    for i, ins in enumerate(code):
        if ins.base == "EXIT" and not ins.predicate:
            return code[:i + 1]
    return code


def _innermost(spans: list) -> list:
    """The (first, last) spans that contain no other span of ``spans``."""
    return [(a, b) for a, b in spans if not any((c, d) != (a, b) and a <= c and d <= b for c, d in spans)]


def mma_flops(code: list[Instruction], num_warps: int) -> float:
    """Tensor-core flops per CTA of one pass through ``code``: each wgmma (shape in its
    opcode, e.g. ``QGMMA.64x128x32``) is issued once per warpgroup of 4 warps; a
    16-bit one counts twice, as it runs at half the fp8 rate."""
    total = 0.0
    for ins in code:
        m = _SHAPE.search(ins.opcode + ".") if _MMA.match(ins.opcode) else None
        if m:
            mm, nn, kk = map(int, m.groups())
            total += 2 * mm * nn * kk * (1 if ins.opcode.startswith(("QGMMA", "IGMMA")) else 2)
    return total * max(1, num_warps // 4)


def analyze(sass_text: str, unit: Unit, registers: int, num_warps: int, shared_bytes: int,
            machine: dict = H200) -> dict:
    """Steady-state code, instruction mix, wait depth, occupancy and prediction of one kernel.

    The steady state of a GEMM or attention kernel is its innermost loop holding an MMA;
    of a cast, every innermost loop (the amax pre-pass of a block-scaled cast and the
    pass that stores, each over the same chunks); of a kernel without loops, all of it
    (``unit.per_thread`` then counts the elements of the whole program), up to its first
    unconditional EXIT (:func:`main_path`). A cast whose chunks branch between the bare
    conversion and the fix-ups (an if/else diamond, :func:`split_paths`) is counted on the
    shorter side, the path of chunks without overflow, Inf or NaN; the longer side is
    reported as ``slow_path_instructions_per_element``.
    """
    code = parse_sass(sass_text)
    if unit.family in ("gemm", "attention"):
        loop = steady_state_loop(code, _MMA)
        spans = [loop] if loop else []
    else:
        spans = _innermost(loops(code))
    body = [i for i in code if any(a <= i.address <= b for a, b in spans)] if spans else main_path(code)
    if not spans and unit.family == "cast":
        unit = Unit(unit.family, unit.per_thread_kernel or unit.per_thread, unit.bytes_per_element)
    slow = None
    if unit.family == "cast":  # a chunk that branches to fix-ups: the steady state is the path without them
        fast = split_paths(body)
        if len(fast) < len(body):
            slow = split_paths(body, shorter=False)
            body = fast
    loop_mix = mix(body)
    depth = wait_depth(body)
    ctas = occupancy(registers, num_warps, shared_bytes, machine)
    if unit.family in ("gemm", "attention"):
        unit = Unit(unit.family, unit.per_thread, mma_flops=mma_flops(body, num_warps))
    mma_ops = sorted({i.opcode for i in body if _MMA.match(i.opcode)})
    row = dict(
        loop=", ".join(f"{a:#x}-{b:#x}" for a, b in spans) if spans else "none (straight-line)",
        loop_mix=loop_mix, loop_opcodes=_histogram(body), kernel_instructions=len(code), mma_instructions=mma_ops,
        wait_depth=depth, tma=any(i.opcode.startswith("UTMA") for i in code), ctas_per_sm=ctas,
        warps_per_sm=ctas * num_warps, per_thread=unit.per_thread,
    )
    if unit.family in ("gemm", "attention") and not unit.mma_flops:
        row["prediction"] = "none: no wgmma shape in the loop (the model is for sm_90)"
        return row
    row.update(predict(unit, loop_mix, num_warps, ctas, depth, machine))
    if slow is not None:
        row["slow_path_instructions_per_element"] = round(len(slow) / unit.per_thread, 2)
    return row


# ----------------------------------------------------------------------------
# The report: workloads, compilation, goals
# ----------------------------------------------------------------------------

_ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "u8": 1, "fp8e4nv": 1, "fp8e5": 1}
_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)\.")


@dataclass
class Part:
    """One kernel launch of a workload: its spec, and what its steady-state iteration does."""

    spec: object  # tritonfp8.ops.spec.KernelSpec
    unit: Unit
    prepass: bool = False  # a pass before the op's main kernel (a cast's amax): not in the reference ratio


@dataclass
class Workload:
    """A row of the report: the launches of one op call (a tensor-scaled cast is its amax
    pre-pass plus the cast), the reference row it is set beside, and its goal."""

    name: str
    family: str
    parts: list
    reference: Optional[str] = None
    is_reference: bool = False
    targets: tuple = (90,)
    goal: Optional[str] = None


def _threads(spec) -> int:
    return 32 * spec.num_warps


def _cast_unit(spec, in_bytes: int, transpose: bool, stores: bool = True) -> Unit:
    c = spec.constexprs
    chunk = c.get("CHUNK_M", c["TILE_M"]) * c["TILE_K"]
    out_bytes = (2 if transpose else 1) if stores else 0
    return Unit("cast", per_thread=chunk / _threads(spec), bytes_per_element=in_bytes + out_bytes,
                per_thread_kernel=c["TILE_M"] * c["TILE_K"] / _threads(spec))


def _cast_workloads() -> list:
    """Casts of a contiguous bf16 [4096, 4096] input, as fp8 Linear layers cast activations."""
    import torch

    from .formats import E4M3
    from .ops import baseline
    from .ops import quantize as q
    from .ops.spec import captured_launches, spec_from_launch
    from .tensor import Scaling

    x = torch.empty((4096, 4096), dtype=torch.bfloat16, device="meta")
    rows = []
    for scaling in ("none", "tensor", (1, 128), (128, 128), "mx"):
        for rounding in ("nearest", "stochastic"):
            for transpose in (False, True):
                sc = Scaling.parse(scaling)
                with captured_launches() as launches:
                    q._quantize_triton(x, E4M3, rounding, sc, 1234, True, transpose, None, 0, False)
                parts = []
                for launch in launches:
                    is_amax = launch.kernel is q._amax_kernel
                    spec = spec_from_launch(launch.kernel.__name__, launch)
                    parts.append(Part(spec, _cast_unit(spec, 2, transpose, stores=not is_amax), prepass=is_amax))
                name = f"cast e4m3 {sc} {rounding}{' +T' if transpose else ''} bf16"
                plus_t = ' +T' if transpose else ''
                if rounding == "stochastic":
                    reference = "ref philox4 cast e4m3 bf16"
                elif sc.kind in ("block", "mx"):  # its groups' amax and scales are part of the job
                    reference = f"ref hw block cast e4m3 {sc}{plus_t} bf16"
                else:
                    reference = f"ref hw cast e4m3{plus_t} bf16"
                goal = "ipe_ratio<=1.3" if rounding == "nearest" else "ipe<=45"
                rows.append(Workload(name, "cast", parts, reference=reference, goal=goal))
    for transpose in (False, True):
        with captured_launches() as launches:
            baseline.hw_cast(x, "e4m3", transpose)
        spec = spec_from_launch("_hw_cast_kernel", launches[0])
        rows.append(Workload(f"ref hw cast e4m3{' +T' if transpose else ''} bf16", "cast",
                             [Part(spec, _cast_unit(spec, 2, transpose))], is_reference=True))
        for scaling, exact in (((1, 128), True), ((1, 128), False), ((128, 128), True), ("mx", True)):
            sc = Scaling.parse(scaling)
            with captured_launches() as launches:
                baseline.hw_block_cast(x, scaling, "e4m3", transpose, exact)
            spec = spec_from_launch("_hw_block_cast_kernel", launches[0])
            name = f"ref hw block cast e4m3 {sc}{'' if exact else ' approx-div'}{' +T' if transpose else ''} bf16"
            rows.append(Workload(name, "cast", [Part(spec, _cast_unit(spec, 2, transpose))], is_reference=True))
    with captured_launches() as launches:
        baseline.philox4_cast(x, 1234, "e4m3")
    spec = spec_from_launch("_philox4_cast_kernel", launches[0])
    rows.append(Workload("ref philox4 cast e4m3 bf16", "cast", [Part(spec, _cast_unit(spec, 2, False))],
                         is_reference=True))
    return rows


def _optimizer_workloads() -> list:
    from .ops import optim

    rows = []
    for spec in optim.aot_specs():
        sig = spec.signature
        state = [n for n in ("buf_ptr", "exp_avg_ptr", "exp_avg_sq_ptr") if n in sig]
        if spec.constexprs.get("MOMENTUM") is False:
            state = []
        size = lambda n: _ELEMENT_BYTES[sig[n][1:]]  # noqa: E731
        # reads: param, grad and the states; writes: param and the states
        traffic = 2 * size("param_ptr") + size("grad_ptr") + 2 * sum(size(n) for n in state)
        unit = Unit("optimizer", per_thread=spec.constexprs["BLOCK"] / _threads(spec), bytes_per_element=traffic)
        rows.append(Workload(f"optimizer {spec.name}", "optimizer", [Part(spec, unit)]))
    return rows


def _gemm_workloads() -> list:
    import torch

    from .ops import baseline
    from .ops import matmul as mm
    from .ops.spec import captured_launches, spec_from_launch

    rows = []
    cases = [  # (config, a scaling, b scaling, out, rounding, variant, goal[, fast accumulation])
        (mm.CONFIGS[0], "tensor", "tensor", "bf16", "nearest", "tma", "tflops_ratio>=0.9"),
        (mm.CONFIGS[0], "tensor", "tensor", "bf16", "nearest", "tma", "tflops_ratio>=0.9", True),
        (mm.CONFIGS[2], "tensor", "tensor", "bf16", "nearest", "tma", "tflops_ratio>=0.9"),
        (mm.CONFIGS[0], "tensor", "tensor", "bf16", "nearest", "pointer", None),
        (mm.CONFIGS[0], (1, 128), (128, 128), "bf16", "nearest", "tma", None),
        (mm.CONFIGS[0], "tensor", "tensor", "e4m3", "stochastic", "tma", None),
        (mm.CONFIGS[0], "mx", "mx", "bf16", "nearest", "pointer", None),
    ]
    for config, a_s, b_s, out, rounding, variant, goal, *fast in cases:
        spec = mm.aot_spec(config, "e4m3", "e4m3", a_s, b_s, out, rounding=rounding, variant=variant,
                           fast_accumulation=bool(fast and fast[0]))
        reference = f"ref gemm no promotion {config}" if goal else None
        rows.append(Workload(spec.name, "gemm", [Part(spec, Unit("gemm", per_thread=1))], reference=reference,
                             targets=(90, 100), goal=goal))
    for config in (mm.CONFIGS[0], mm.CONFIGS[2]):
        a = torch.empty((8192, 4096), dtype=torch.float8_e4m3fn, device="meta")
        bt = torch.empty((8192, 4096), dtype=torch.float8_e4m3fn, device="meta")
        one = torch.empty((), dtype=torch.float32, device="meta")
        with captured_launches() as launches:
            baseline.gemm_no_promotion(a, bt, one, one, config)
        spec = spec_from_launch("_gemm_no_promotion_kernel", launches[0], fp8_mma=True)
        rows.append(Workload(f"ref gemm no promotion {config}", "gemm", [Part(spec, Unit("gemm", per_thread=1))],
                             is_reference=True, targets=(90, 100)))
    return rows


def _attention_workloads() -> list:
    import torch

    from .ops import attention as at
    from .ops import baseline
    from .ops.spec import captured_launches, spec_from_launch

    rows = []
    tiles = at._GPU_CONFIGS[128]
    for kind, causal in (("fwd", False), ("fwd", True), ("dkdv", False), ("dq", False)):
        spec = at._aot_spec(kind, 128, causal, "bf16", masked=False)
        c = spec.constexprs
        rows_, cols = ((c["BLOCK_M"], c["BLOCK_N"]) if kind == "fwd" else (c["BLOCK_N1"], c["BLOCK_M1"])
                       if kind == "dkdv" else (c["BLOCK_M2"], c["BLOCK_N2"]))
        unit = Unit("attention", per_thread=rows_ * cols / _threads(spec))
        is_fwd = kind == "fwd" and not causal
        rows.append(Workload(spec.name, "attention", [Part(spec, unit)], targets=(90, 100),
                             reference="ref attention fwd hw P D=128" if is_fwd else None,
                             goal="non_mma_ratio<=2" if is_fwd else None))
    q8 = torch.empty((4, 16, 4096, 128), dtype=torch.float8_e4m3fn, device="meta")
    vt8 = torch.empty((4, 16, 128, 4096), dtype=torch.float8_e4m3fn, device="meta")
    t = tiles.fwd
    with captured_launches() as launches:
        baseline.attention_fwd_hw_p(q8, q8, vt8, 0.088, t.rows, t.cols, t.num_warps, t.num_stages)
    spec = spec_from_launch("_attention_fwd_hw_p_kernel", launches[0], fp8_mma=True)
    unit = Unit("attention", per_thread=t.rows * t.cols / _threads(spec))
    rows.append(Workload("ref attention fwd hw P D=128", "attention", [Part(spec, unit)], is_reference=True,
                         targets=(90, 100)))
    return rows


def workloads() -> list:
    """Every row of the report, references included (built on ``meta`` tensors: no GPU)."""
    return _cast_workloads() + _optimizer_workloads() + _gemm_workloads() + _attention_workloads()


def _memory_bound_total(parts: list) -> dict:
    """A memory-bound workload of several launches: their instructions and bytes per element add."""
    ipe = sum(p["instructions_per_element"] for p in parts)
    bytes_per_element = sum(p["bytes_per_element"] for p in parts)
    unit = Unit("cast", per_thread=1.0, bytes_per_element=bytes_per_element)
    out = predict(unit, {"total": ipe, "mma": 0}, 4, 1, None)
    out["bytes_per_element"] = bytes_per_element
    return out


def run_workload(index: int, targets=(90, 100)) -> list:
    """Compile and analyze workload ``index`` of :func:`workloads` for each of its targets (in ``targets``)."""
    from .ops.spec import build, dump_sass, resource_usage

    work = workloads()[index]
    rows = []
    for cc in [t for t in work.targets if t in targets]:
        row = dict(name=work.name, family=work.family, target=f"sm_{cc}", reference=work.reference,
                   is_reference=work.is_reference, goal=work.goal, parts=[])
        try:
            for part in work.parts:
                compiled = build(part.spec, cc)
                usage = resource_usage(compiled.asm["cubin"])
                info = dict(kernel=part.spec.kernel.__name__, prepass=part.prepass, num_warps=part.spec.num_warps,
                            num_stages=part.spec.num_stages, registers=usage.get("reg"),
                            spill_bytes=usage.get("stack", 0), shared_bytes=compiled.metadata.shared)
                info.update(analyze(dump_sass(compiled.asm["cubin"]), part.unit, info["registers"],
                                    part.spec.num_warps, info["shared_bytes"]))
                if part.unit.bytes_per_element:
                    info["bytes_per_element"] = part.unit.bytes_per_element
                row["parts"].append(info)
        except Exception as exc:  # reported, and failed by the test
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            rows.append(row)
            continue
        row["ok"] = True
        if work.family in ("cast", "optimizer"):
            row["total"] = _memory_bound_total(row["parts"])
        else:
            row["total"] = {k: v for k, v in row["parts"][0].items()
                            if k in ("predicted_tflops", "fraction_of_fp8_peak", "non_mma_per_score",
                                     "non_mma_per_iteration", "wait_depth", "ctas_per_sm")}
        rows.append(row)
    return rows


# Issue 11's goals: name -> (measured as the ratio to the reference, whether a value meets it).
_GOALS = {
    "ipe<=45": (False, lambda v: v <= 45),
    "ipe_ratio<=1.3": (True, lambda v: v <= 1.3),
    "tflops_ratio>=0.9": (True, lambda v: v >= 0.9),
    "non_mma_ratio<=2": (True, lambda v: v <= 2),
}


_STEADY_STATE = """
    Steady state: a GEMM's or attention's innermost loop holding an MMA; a cast's innermost
    loops (a kernel without loops: all of it up to its first EXIT). A cast whose chunks branch
    between rounding without and with the overflow / Inf / NaN fix-ups (every scaling but row /
    column current scaling) is counted on the path without them, which chunks that cannot
    overflow take; the other path is ``slow_path_instructions_per_element`` in the JSON.
    Nearest casts with block or MX scales are set beside a reference that computes its groups'
    scales too (exact divisions, as numerics.md's scales are; an ``approx-div`` row shows the
    cost of that exactness), the others beside the plain hardware-conversion cast.
"""


def _check(row: dict, ratio: Optional[float]) -> Optional[dict]:
    """The goal of a sm_90 row, measured on its own figure or its ``ratio`` to its reference
    (None: no reference row): {goal, value, holds}."""
    goal = row.get("goal")
    if not goal or not row.get("ok") or row["target"] != "sm_90":
        return None
    relative, meets = _GOALS[goal]
    value = ratio if relative else round(_headline(row), 2)
    if value is None:
        return dict(goal=goal, value=None, holds=False, why="reference row missing")
    return dict(goal=goal, value=value, holds=meets(value))


def report(jobs: int = 2, name_filter: str = "", targets=(90, 100)) -> dict:
    """Every workload whose name contains one of the ``|``-separated ``name_filter`` strings
    (all when empty; names hold commas), and the references they need, compiled and
    analyzed; goals evaluated on sm_90."""
    import triton

    from concurrent.futures import ProcessPoolExecutor

    all_work = workloads()
    wanted = [f for f in name_filter.split("|") if f] or [""]
    chosen = {i for i, w in enumerate(all_work) if any(f in w.name for f in wanted)}
    needed = {w.reference for i, w in enumerate(all_work) if i in chosen and w.reference}
    chosen |= {i for i, w in enumerate(all_work) if w.name in needed}
    order = sorted(chosen)
    if jobs <= 1:
        results = [run_workload(i, tuple(targets)) for i in order]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(run_workload, order, [tuple(targets)] * len(order)))
    rows = [r for rs in results for r in rs]
    by_key = {(r["name"], r["target"]): r for r in rows}
    for r in rows:
        ref = by_key.get((r["reference"], r["target"]))
        if ref and ref.get("ok") and r.get("ok"):
            r["ratio_to_reference"] = _ratio(r, ref)
        r["check"] = _check(r, r.get("ratio_to_reference"))
    spills = [(r["name"], p["kernel"], p["spill_bytes"]) for r in rows if r.get("ok") and not r["is_reference"]
              and r["target"] == "sm_90" for p in r["parts"] if p["spill_bytes"]]
    return dict(triton=triton.__version__, machine=H200, model=predict.__doc__ + _STEADY_STATE, rows=rows,
                spills_sm90=spills, failed=[(r["name"], r["target"], r["error"]) for r in rows if not r.get("ok")])


def _headline(row: dict):
    """A row's figure compared with its reference's: instructions per element of the main
    pass (casts, optimizer; an amax pre-pass has no counterpart in the reference), non-MMA
    instructions per score (attention) or predicted TFLOP/s (GEMM)."""
    if row["family"] in ("cast", "optimizer"):
        return sum(p["instructions_per_element"] for p in row["parts"] if not p["prepass"])
    return row["total"].get("non_mma_per_score" if row["family"] == "attention" else "predicted_tflops")


def _ratio(row: dict, ref: dict) -> Optional[float]:
    a, b = _headline(row), _headline(ref)
    return round(a / b, 2) if a is not None and b else None


def markdown(rep: dict) -> str:
    """The report as markdown: one table per family, then the goals."""
    m = rep["machine"]
    lines = [
        f"# SASS report (Triton {rep['triton']}; predictions for {m['name']})", "",
        "Generated by `python -m tritonfp8.aot --sass-report <dir>`; do not edit by hand. Every "
        "kernel is compiled as the JIT compiles it: the casts, the optimizer and the reference "
        "kernels from their launchers run on meta tensors and specialized by Triton's own binder; "
        "the GEMM and attention kernels from their hand-written specs (`aot_spec`), which "
        "specialize the same way. Figures are predictions from the model below until a GPU "
        "measures them.", "",
        f"Machine model: {m['sms']} SMs x {m['schedulers']} schedulers at {m['clock_hz'] / 1e9:.2f} GHz, "
        f"HBM {m['hbm_bytes_per_s'] / 1e12:.1f} TB/s, dense fp8 {m['fp8_flops'] / 1e12:.0f} TFLOP/s.", "",
    ]
    doc = " ".join(line.strip() for line in rep["model"].strip().splitlines())
    lines += [f"Model: {doc}", ""]
    rows = rep["rows"]

    def fmt_parts(r, key):
        return " + ".join(str(p.get(key)) for p in r["parts"])

    def table(title, columns, chosen, cells):
        """A markdown table of ``chosen`` rows; a row that failed to compile says so."""
        if not chosen:
            return
        lines.extend([title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)])
        for r in chosen:
            if not r.get("ok"):
                lines.append(f"| {r['name']} | {r['target']} | FAILED: {r['error']} |" + " |" * (len(columns) - 3))
            else:
                lines.append("| " + " | ".join(str(c) for c in [r["name"], r["target"], *cells(r)]) + " |")
        lines.append("")

    def memory_cells(r):
        t = r["total"]
        sync = " + ".join(f"{p['loop_mix']['bar_sync']}+{p['loop_mix']['shfl']}" for p in r["parts"])
        return [fmt_parts(r, "registers"), fmt_parts(r, "spill_bytes"), fmt_parts(r, "shared_bytes"),
                fmt_parts(r, "ctas_per_sm"), f"{t['instructions_per_element']} ({fmt_parts(r, 'instructions_per_element')})",
                sync, t["bytes_per_element"], t["bound"], f"{100 * t['fraction_of_hbm']:.0f}%", _fmt_ratio(r),
                _fmt_check(r)]

    def mma_cells(r):
        p = r["parts"][0]
        return [p["registers"], p["spill_bytes"], p["shared_bytes"], p["ctas_per_sm"],
                ", ".join(f"`{o}`" for o in p["mma_instructions"]) or "-", p["wait_depth"],
                "yes" if p["tma"] else "no", p["loop_mix"]["total"] - p["loop_mix"]["mma"], p["loop_mix"]["bar_sync"],
                p.get("non_mma_per_score", "-"), p.get("predicted_tflops", "-"), _fmt_ratio(r), _fmt_check(r)]

    table("## Casts and optimizer (memory-bound; per input element)",
          ["kernel", "target", "registers", "spills", "shared", "CTAs/SM", "instr/elt", "BAR.SYNC + SHFL per iteration",
           "bytes/elt", "bound", "predicted % of HBM", "vs reference", "goal"],
          [r for r in rows if r["family"] in ("cast", "optimizer")], memory_cells)
    table("## GEMM and attention (per K-step / per key block of one CTA)",
          ["kernel", "target", "registers", "spills", "shared", "CTAs/SM", "MMA", "wait depth", "TMA",
           "non-MMA instr/iteration", "BAR.SYNC", "non-MMA per score", "predicted TFLOP/s", "vs reference", "goal"],
          [r for r in rows if r["family"] in ("gemm", "attention")], mma_cells)
    checks = [r for r in rows if r.get("check")]
    lines += ["## Goals (issue 11, on sm_90)", "",
              f"- No spills in any shipped configuration on sm_90: "
              f"{'holds' if not rep['spills_sm90'] else 'does NOT hold: ' + str(rep['spills_sm90'])}."]
    held = sum(1 for r in checks if r["check"]["holds"])
    lines.append(f"- {held} of {len(checks)} per-kernel goals hold (the `goal` columns above).")
    if rep["failed"]:
        lines.append(f"- FAILED to compile: {rep['failed']}")
    return "\n".join(lines) + "\n"


def _fmt_ratio(r: dict) -> str:
    v = r.get("ratio_to_reference")
    return f"{v}x" if v is not None else "-"


def _fmt_check(r: dict) -> str:
    c = r.get("check")
    if not c:
        return "reference" if r["is_reference"] else "-"
    return f"{c['goal']}: {c['value']} {'holds' if c['holds'] else 'NOT met'}"


def compare(before: dict, after: dict) -> str:
    """Markdown table of two reports' headline figures on sm_90, row by row (``after``'s rows)."""
    def base(name):  # a variant's suffix (hardware conversion) does not make it another kernel
        return re.sub(r",hwP?\]$", "]", name)

    old = {base(r["name"]): r for r in before["rows"] if r["target"] == "sm_90" and r.get("ok")}
    lines = ["| kernel | figure | before | after | registers before -> after | goal after |", "|---|---|---|---|---|---|"]
    for r in after["rows"]:
        if r["target"] != "sm_90" or not r.get("ok"):
            continue
        figure = {"cast": "instr/elt", "optimizer": "instr/elt", "attention": "non-MMA/score",
                  "gemm": "predicted TFLOP/s"}[r["family"]]
        prev = old.get(base(r["name"]))
        value = lambda row: _headline(row) if row else None  # noqa: E731
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        regs = lambda row: "+".join(str(p["registers"]) for p in row["parts"]) if row else "-"  # noqa: E731
        lines.append(f"| {r['name']} | {figure} | {fmt(value(prev))} | {fmt(value(r))} | {regs(prev)} -> {regs(r)} | "
                     f"{_fmt_check(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m tritonfp8.sass",
                                     description="compare two SASS reports (sass_report.json) on sm_90")
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args(argv)
    with open(args.before) as f, open(args.after) as g:
        print(compare(json.load(f), json.load(g)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

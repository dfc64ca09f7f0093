"""Every kernel configuration compiles for sm_89, sm_90 and sm_100 without a GPU,
spills no registers, and products use the fp8 tensor-core instructions.

The compiles run in a subprocess: this test process has Triton in interpreter
mode, and interpreted kernels cannot be compiled."""
import json
import subprocess
import sys

import pytest
from conftest import compiled_env

from tritonfp8.aot import KERNEL_MODULES, TARGETS


@pytest.fixture(scope="module")
def aot_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = compiled_env()
    proc = subprocess.run(
        [sys.executable, "-m", "tritonfp8.aot", "--json", str(out), "--jobs", "2"],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    assert out.exists(), f"aot report not written:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_every_module_and_target_is_covered(aot_rows):
    for module in KERNEL_MODULES:
        targets = {r["target"] for r in aot_rows if r["module"] == module}
        assert targets == {f"sm_{cc}" for cc in TARGETS}, module


def test_every_spec_compiles(aot_rows):
    failed = [(r["name"], r["target"], r.get("error")) for r in aot_rows if not r["ok"]]
    assert not failed, failed


def test_no_spills(aot_rows):
    """STACK 0 on every target a spec promises (all, unless the spec names fewer: the
    GEMM configs promise sm_90, the contract of issue 3)."""
    spills = [(r["name"], r["target"], r.get("stack")) for r in aot_rows
              if r["ok"] and r["spill_checked"] and r.get("stack", 0) != 0]
    assert not spills, spills
    assert all("reg" in r for r in aot_rows if r["ok"]), "cuobjdump reported no registers"


def test_products_use_fp8_tensor_cores(aot_rows):
    missing = [(r["name"], r["target"]) for r in aot_rows if r["ok"] and r["fp8_mma_required"] and not r.get("mma")]
    assert not missing, missing
    for r in aot_rows:
        if r["ok"] and r["fp8_mma_required"]:
            expected = {"sm_89": "mma.sync", "sm_90": "wgmma.mma_async", "sm_100": "tcgen05.mma"}[r["target"]]
            assert r["mma"].startswith(expected), (r["name"], r["target"], r["mma"])


def test_optimizer_kernels_round_every_operation(aot_rows):
    """The fused optimizer's fp32 arithmetic must not be contracted into FMAs: the
    reference rounds a * b and + c separately, and bit-exactness depends on it."""
    rows = [r for r in aot_rows if r["module"] == "tritonfp8.ops.optim" and r["ok"]]
    assert rows and not [r["name"] for r in rows if r["fma"]]

"""The backend switch at run time, and the package's import structure."""
import os
import subprocess
import sys

import torch

import tritonfp8 as tf8
from tritonfp8.ops.attention import attention
from tritonfp8.ops.matmul import transpose_view

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _workload(inputs: dict) -> dict:
    """One of each kernel family on CPU tensors: cast, product, attention forward/backward, optimizer."""
    x, a_x, w_x = inputs["x"], inputs["a"], inputs["w"]
    q = tf8.quantize(x, "e5m2", "stochastic", "tensor", seed=11, transpose=True)
    a = tf8.quantize(a_x, "e4m3", scaling="tensor")
    w = tf8.quantize(w_x, "e4m3", scaling="tensor")
    y = tf8.scaled_mm(a, transpose_view(w), out_dtype=torch.float32)
    qh, kh, vh = (inputs[n].clone().requires_grad_() for n in ("qh", "kh", "vh"))
    o = attention(qh, kh, vh, causal=True)
    o.backward(inputs["do"])
    p = torch.nn.Parameter(inputs["p"].clone())
    opt = tf8.optim.AdamW([p], lr=1e-2, master_dtype=torch.bfloat16, rounding="stochastic", seed=5)
    p.grad = inputs["g"].to(torch.bfloat16)
    opt.step()
    return {
        "codes": q.data.view(torch.uint8), "codes_t": q.transposed.data.view(torch.uint8), "y": y,
        "o": o.detach(), "dq": qh.grad, "dk": kh.grad, "dv": vh.grad, "p": p.detach().view(torch.int16),
    }


def compiled_env() -> dict:
    # Imported here, not at the top: the run-time interpreter test's subprocess imports this
    # module for _workload, and importing conftest would switch it to the interpreter.
    from conftest import compiled_env as env

    return env()


def _inputs() -> dict:
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"x": r(40, 96), "a": r(32, 64), "w": r(48, 64), "qh": r(1, 2, 32, 32), "kh": r(1, 2, 32, 32),
            "vh": r(1, 2, 32, 32), "do": r(1, 2, 32, 32), "p": r(300), "g": r(300)}


_RUN_TIME = """
import sys, torch
import tritonfp8 as tf8
from tritonfp8.backend import triton_interprets
from tritonfp8.ops import quantize as qmod
from triton.runtime.jit import JITFunction
from triton.runtime.interpreter import InterpretedFunction
sys.path.insert(0, "tests")
from test_backend import _workload
assert not triton_interprets() and isinstance(qmod._quantize_kernel, JITFunction), "Triton already interprets"
tf8.set_backend("interpret")
assert isinstance(qmod._quantize_kernel, InterpretedFunction)
out = _workload(torch.load(sys.argv[1]))
tf8.set_backend("auto")
assert not triton_interprets() and isinstance(qmod._quantize_kernel, JITFunction), "compiled kernels not restored"
with tf8.use_backend("interpret"):
    assert triton_interprets()
assert not triton_interprets()
torch.save(out, sys.argv[2])
"""


def test_interpret_backend_chosen_at_run_time_runs_the_same_kernels(tmp_path):
    """In a process where Triton compiles, set_backend("interpret") after import builds the
    interpreted kernels, which give the bits of Triton's own interpreter mode (this test
    process runs with TRITON_INTERPRET=1 on a CPU machine); leaving the backend restores the
    compiled kernels. The cast codes and the optimizer's bits also equal the reference's."""
    inputs = _inputs()
    torch.save(inputs, tmp_path / "in.pt")
    res = subprocess.run([sys.executable, "-c", _RUN_TIME, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, env=compiled_env(), cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    with tf8.use_backend("torch"):
        reference = _workload(inputs)
    if not torch.cuda.is_available():
        with tf8.use_backend("interpret"):
            interpreted = _workload(inputs)
        for name, value in interpreted.items():
            assert torch.equal(got[name], value), f"{name}: run-time interpreter != TRITON_INTERPRET=1"
    for name in ("codes", "codes_t", "p"):
        assert torch.equal(got[name], reference[name]), f"{name}: interpreted kernel != reference"
    torch.testing.assert_close(got["y"], reference["y"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Import structure: imports point down the layers, and no module imports itself back
# ----------------------------------------------------------------------------

# Lowest first. A module may import modules of its own layer or of lower ones, never higher.
LAYERS = (
    ("base", ("tritonfp8.backend", "tritonfp8.formats", "tritonfp8._active", "tritonfp8._autograd",
              "tritonfp8._distributed")),
    ("ops", ("tritonfp8.ops", "tritonfp8.tensor", "tritonfp8.recipe")),
    ("nn", ("tritonfp8.nn",)),
    ("autocast", ("tritonfp8.autocast", "tritonfp8._autocast_policy")),
    ("training", ("tritonfp8.training", "tritonfp8.optim", "tritonfp8.trainer", "tritonfp8.data")),
    ("tools", ("tritonfp8.reproduce", "tritonfp8.aot", "tritonfp8.sass", "tritonfp8.cli", "tritonfp8.__main__")),
)


def _package_modules() -> dict:
    """{module name: (path, is_package)} of every module of the package but its root."""
    import pathlib

    root = pathlib.Path(ROOT) / "tritonfp8"
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        name = ".".join(parts)
        if name != "tritonfp8":
            out[name] = (path, is_pkg)
    return out


def _imports_of(name: str, path, is_pkg: bool, modules: dict) -> set:
    """Package modules that ``name`` imports anywhere in its source (functions included)."""
    import ast

    package = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t in modules and t != name:
                found.add(t)
    return found


def _layer(name: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"module {name} is in no layer of LAYERS: add it there")


def test_imports_point_down_the_layers_without_cycles():
    modules = _package_modules()
    graph = {name: _imports_of(name, *info, modules) for name, info in modules.items()}
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
              for a, targets in graph.items() for b in sorted(targets) if _layer(b) > _layer(a)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)
    # A package's __init__ importing its own submodules is how packages work; any other cycle is a defect.
    edges = {a: {b for b in t if not (modules[a][1] and b.startswith(a + "."))} for a, t in graph.items()}
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


_IMPORT_EACH = """
import importlib, os, sys, traceback
import numpy, torch, triton  # the dependencies, loaded once; each module is imported in a fork
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        sys.argv = [name]  # tritonfp8.__main__ runs the CLI when imported: no arguments, it prints info
        try:
            importlib.import_module(name)
        except SystemExit as e:  # the CLI's usage message
            os._exit(0 if e.code in (0, None) else 1)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("FAILED " + " ".join(failed) if failed else "ok")
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module first in an interpreter that has imported nothing of tritonfp8 (a fork of
    one that loaded torch, triton and numpy, which would otherwise cost 2 s per module)."""
    res = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *sorted(_package_modules())],
                         capture_output=True, text=True, env=compiled_env(), cwd=ROOT, timeout=600)
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0 and last == "ok", res.stdout[-2000:] + res.stderr[-3000:]

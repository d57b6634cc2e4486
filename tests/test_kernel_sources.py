"""What a GPU build refuses but Triton's interpreter (our CI) accepts: a @triton.jit function
reading a plain Python global (triton 3.9: "Cannot access global variable"; found in route's
kernel by an offline sm_90 build), checked in the sources; and the grouped GEMM's FP8 paths,
built offline for GPUs we do not have (triton.compile to PTX and cubin, no GPU needed)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = sorted((Path(__file__).parents[1] / "ds_kernels" / "kernels").glob("*.py"))


def _module_values(tree):
    """Module-level names bound by assignment (with their source) or imported by name."""
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    values[target.id] = ast.unparse(node.value)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                values[alias.asname or alias.name] = f"from {node.module} import {alias.name}"
    return values


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.name)
def test_jit_functions_read_only_constexpr_globals(path):
    tree = ast.parse(path.read_text())
    values = _module_values(tree)
    bad = []
    for node in tree.body:
        if not (isinstance(node, ast.FunctionDef)
                and any("jit" in ast.unparse(d) for d in node.decorator_list)):
            continue
        params = {a.arg for a in node.args.args}
        called = {id(call.func) for call in ast.walk(node) if isinstance(call, ast.Call)}
        for name in ast.walk(node):
            if (isinstance(name, ast.Name) and isinstance(name.ctx, ast.Load)
                    and name.id in values and name.id not in params
                    and id(name) not in called  # imported @triton.jit helpers are called
                    and "constexpr" not in values[name.id]):
                bad.append(f"{node.name} reads {name.id} = {values[name.id]}")
    assert not bad, f"{path.name}: wrap these in tl.constexpr: {bad}"


# Run in a fresh interpreter: under TRITON_INTERPRET=1 (conftest) the kernels are decorated for
# the interpreter and cannot be compiled.
_BUILD = """
import inspect, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ds_kernels.kernels.grouped_mm import _grouped_gemm_kernel

capability, w8a8 = int(sys.argv[1]), sys.argv[2] == "w8a8"
constexprs = dict(A_ROW_DIV=8, A_BY_SLOT=False, C_BY_SLOT=True, SWIGLU=True, CLAMP=True,
                  ROW_SCALE=False,
                  PRECISION="ieee", ACC=tl.float32, QUANT_B=True, B_TRANSPOSED=True, FP4=False,
                  E8M0_SCALES=False, SCALE_ROWS=128, SCALE_COLS=128, W8A8=w8a8, BLOCK_M=64,
                  BLOCK_N=128, BLOCK_K=128, GROUP_M=8)
pointers = dict(a_ptr="*bf16", b_ptr="*u8", c_ptr="*bf16", slot_ids_ptr="*i32",
                block_expert_ptr="*i32", num_slots_ptr="*i32", row_scale_ptr="*fp32",
                s_ptr="*fp32", limit="fp32")
params = list(inspect.signature(_grouped_gemm_kernel.fn).parameters)
signature = {p: "constexpr" if p in constexprs else pointers.get(p, "i32") for p in params}
source = ASTSource(fn=_grouped_gemm_kernel, signature=signature,
                   constexprs={(params.index(n),): v for n, v in constexprs.items()})
built = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                       options=dict(num_warps=8, num_stages=3))
print("e4m3 mma" if "e4m3.e4m3" in built.asm["ptx"] else "no e4m3 mma", len(built.asm["cubin"]))
"""


def _build_grouped_gemm(capability: int, variant: str, *, fails: bool = False) -> str:
    """fused_moe's gate/up GEMM (bf16 activations, FP8 weights, V4's SwiGLU clamp) built to
    PTX and cubin for
    sm_<capability>: what the build printed (stderr where it is to fail)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _BUILD, str(capability), variant], env=env,
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode != 0) == fails, done.stderr[-2000:]
    return done.stderr if fails else done.stdout


@pytest.mark.parametrize("capability", [89, 90])
def test_w8a8_builds_fp8_tensor_core_products(capability):
    """act_quant="fp8" compiles for Ada and Hopper to e4m3 x e4m3 MMAs (the interpreter runs
    the same kernel in numpy; this is the build a GPU would do)."""
    assert _build_grouped_gemm(capability, "w8a8").startswith("e4m3 mma")


def test_weight_only_fp8_builds_for_gpus_without_fp8():
    """Weight-only FP8 decodes its codes arithmetically: it builds for sm_80 too. w8a8 does not
    (hence kernels/grouped_mm.check_fp8_tensor_cores, a clear error before any build)."""
    assert _build_grouped_gemm(80, "weight-only").startswith("no e4m3 mma")
    assert "CompilationError" in _build_grouped_gemm(80, "w8a8", fails=True)


_BUILD_INDEXER = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ds_kernels.kernels.index_cache_write import _index_cache_write_kernel
from ds_kernels.kernels.lightning_indexer import _merge_kernel, _top_keys_kernel

capability = int(sys.argv[1])
top_keys = dict(PAGE=64, BLOCK_H=64, BLOCK_D=128, BLOCK_N=64, TOPK=2048, FINAL=False,
                PRECISION="ieee", UPCAST=False)
for kernel, constexprs, cache in [
        (_top_keys_kernel, dict(top_keys, FP8=False), "*bf16"),
        (_top_keys_kernel, dict(top_keys, FP8=True), "*u8"),
        (_merge_kernel, dict(PAGE=64, TOPK=2048), None),
        (_index_cache_write_kernel, dict(INTERLEAVED=False, FP8=False, BLOCK_T=8, BLOCK_D=128),
         "*bf16"),
        (_index_cache_write_kernel, dict(INTERLEAVED=False, FP8=True, BLOCK_T=8, BLOCK_D=128),
         "*u8")]:
    pointers = dict(q_ptr="*bf16", w_ptr="*fp32", cache_ptr=cache, block_table_ptr="*i32",
                    seq_ptr="*i32", pos_ptr="*i32", part_ptr="*i64", slots_ptr="*i32",
                    k_ptr="*bf16", b_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32",
                    slot_ptr="*i64", eps="fp32")
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {p: "constexpr" if p in constexprs else pointers.get(p, "i32") for p in params}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(params.index(n),): v for n, v in constexprs.items()})
    built = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                           options=dict(num_warps=8, num_stages=1))
    print(kernel.fn.__name__, len(built.asm["cubin"]))
"""


def test_lightning_indexer_builds_at_deepseek_v32s_shape():
    """64 heads x 128 dims, top 2048 (the running keys and bitonic merges of 4096 int64 in
    registers), bf16 keys or FP8 rows: both kernels compile for Hopper, and so does the
    index-key cache write at Di = 128, both cache formats (the tests run them in the interpreter;
    this is the build a GPU would do; ~30 s each, uncached)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _BUILD_INDEXER, "90"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line.split()[0] for line in done.stdout.splitlines()] == [
        "_top_keys_kernel", "_top_keys_kernel", "_merge_kernel", "_index_cache_write_kernel",
        "_index_cache_write_kernel"]


_BUILD_MHC = """
import inspect, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.backends.nvidia.compiler import get_ptxas
from ds_kernels.kernels import mhc

for kernel, constexprs in [
        (mhc._mhc_pre_kernel, dict(N=4, NP=4, MP=32, ITERS=20, BLOCK_T=mhc._BLOCK_T,
                                   BLOCK_K=mhc._BLOCK_K, BLOCK_D=mhc._BLOCK_D)),
        (mhc._mhc_post_kernel, dict(N=4, NP=4, BLOCK_T=mhc._POST_BLOCK_T,
                                    BLOCK_D=mhc._POST_BLOCK_D))]:
    pointers = dict(streams_ptr="*bf16", fn_ptr="*fp32", base_ptr="*fp32", scale_ptr="*fp32",
                    collapsed_ptr="*bf16", post_ptr="*fp32", comb_ptr="*fp32", out_ptr="*bf16",
                    mixed_ptr="*bf16", norm_eps="fp32", hc_eps="fp32")
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {p: "constexpr" if p in constexprs else pointers.get(p, "i32") for p in params}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(params.index(n),): v for n, v in constexprs.items()})
    built = triton.compile(source, target=GPUTarget("cuda", int(sys.argv[1]), 32),
                           options=dict(num_warps=4, num_stages=2))
    # Registers and spills as ptxas reports them (no GPU driver here to ask).
    ptxas = get_ptxas(int(sys.argv[1])).path  # the one triton.compile used
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(built.asm["ptx"])
        ptx.flush()
        report = subprocess.run([ptxas, f"-arch=sm_{sys.argv[1]}a", "-v", ptx.name, "-o",
                                 os.devnull], capture_output=True, text=True).stderr
    registers = re.search(r"Used (\\d+) registers", report).group(1)
    spills = re.search(r"(\\d+) bytes spill stores", report).group(1)
    print(kernel.fn.__name__, registers, spills)
"""


def test_mhc_builds_for_hopper_at_deepseek_v4s_shape():
    """4 streams, 20 Sinkhorn rounds, bf16 streams: both kernels compile for sm_90 without
    spilling (the tests run them in the interpreter; this is the build a GPU would do). The
    registers and spills are ptxas's report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _BUILD_MHC, "90"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.split() for line in done.stdout.splitlines()]
    assert [name for name, _, _ in lines] == ["_mhc_pre_kernel", "_mhc_post_kernel"]
    assert all(spills == "0" for _, _, spills in lines), done.stdout

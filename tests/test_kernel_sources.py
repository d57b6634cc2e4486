"""What a GPU build refuses but Triton's interpreter (our CI) accepts, checked in the sources:
a @triton.jit function reading a plain Python global (triton 3.9: "Cannot access global
variable"; found in route's kernel by an offline sm_90 build)."""

import ast
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

"""The benchmark scripts' own bookkeeping, where a silent miscount would change a reported figure."""

import ast
import collections
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models.cpu_kernels import conv2d_same
from experiments.perf import step_floor


def test_step_floor_finds_every_convolution_and_matmul_of_a_gradient():
    """Forward conv + its two hand-written gradient convs (custom VJP, inside a nested jit), and a dot with its two."""
    x, w, v = jnp.ones((2, 4, 4, 3)), jnp.ones((3, 3, 3, 5)), jnp.ones((5, 7))

    @jax.jit
    def f(x, w, v):
        return jnp.sum(conv2d_same(x, w) @ v)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, w, v)
    eqns = step_floor.gemm_eqns(jaxpr.jaxpr)
    assert collections.Counter(e.primitive.name for e in eqns) == {"conv_general_dilated": 3, "dot_general": 3}
    fwd = next(e for e in eqns if e.primitive.name == "conv_general_dilated"
               and tuple(e.invars[1].aval.shape) == (3, 3, 3, 5))
    # 2 FLOPs per multiply-add: every output element (2, 4, 4, 5) contracts a 3x3 window of 3 channels
    assert step_floor._contracted(fwd) == 27
    dot = next(e for e in eqns if e.primitive.name == "dot_general" and tuple(e.invars[1].aval.shape) == (5, 7))
    assert step_floor._contracted(dot) == 5


def test_step_floor_times_each_distinct_op_once_with_its_count():
    x = jnp.ones((2, 4, 4, 3))
    w = jnp.ones((3, 3, 3, 3))

    def f(x, w):
        return jnp.sum(conv2d_same(conv2d_same(x, w), w))  # the same conv signature twice

    floor = step_floor.OpFloor(jax.make_jaxpr(f)(x, w))
    assert [(o["prim"], o["count"]) for o in floor.ops] == [("conv_general_dilated", 2)]
    floor.run()
    s = floor.summary()
    assert s["count"]["conv_general_dilated"] == 2 and s["distinct"] == 1
    assert s["flop"]["conv_general_dilated"] == 2 * (2 * 2 * 4 * 4 * 3 * 27)
    assert np.isfinite(s["seconds"]["conv_general_dilated"]) and s["seconds"]["conv_general_dilated"] >= 0
    # the one-program floor runs both instances, each on its own inputs (XLA must not merge them into one)
    prog = floor.programs["conv_general_dilated"]
    assert len(prog["args"]) == 2 and not np.array_equal(prog["args"][0][0], prog["args"][1][0])
    assert len(prog["fn"](prog["args"])) == 2 and s["one_program_s"]["conv_general_dilated"] > 0


def _top_level_names(tree) -> set:
    """Names a module defines at its top level (functions, classes, assignments, imports)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def test_experiment_scripts_import_each_other_by_existing_paths_and_names():
    """Every ``experiments.<folder>.<script>`` import (top level or inside a function) names a file and its names."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scripts = sorted(glob.glob(os.path.join(root, "experiments", "**", "*.py"), recursive=True))
    checked = 0
    for path in scripts:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "experiments":
                target = os.path.join(root, *node.module.split(".")) + ".py"
                where = f"{os.path.relpath(path, root)}:{node.lineno}"
                if not os.path.isfile(target):  # `from experiments.benchmarks import benchlib`
                    target = os.path.join(root, *node.module.split("."), node.names[0].name + ".py")
                    assert len(node.names) == 1 and os.path.isfile(target), f"{where}: no module {node.module}"
                    checked += 1
                    continue
                with open(target, encoding="utf-8") as f:
                    defined = _top_level_names(ast.parse(f.read(), target))
                missing = [a.name for a in node.names if a.name not in defined]
                assert not missing, f"{where}: {node.module} defines no {missing}"
                checked += 1
    assert checked >= 20, checked  # the perf scripts, ablations and benchmarks share bench_train / benchlib

"""setup.cfg declares what the code imports, and the core install is enough for ``import diffjax``."""

import ast
import configparser
import glob
import importlib.metadata
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what only the `train` extra provides: none of it may load on `import diffjax`
TRAIN_ONLY = ("flax", "optax", "orbax", "tensorflow_datasets", "grain", "ml_collections", "tqdm", "tensorboardX",
              "matplotlib", "PIL", "sklearn", "torch")


def requirements() -> dict:
    """setup.cfg's requirements by section ("core", or the extra's name) -> normalized distribution names."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))

    def names(text):
        return {re.split(r"[<>=!~\[;\s]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
                for line in text.splitlines() if line.strip()}

    out = {"core": names(cfg["options"]["install_requires"])}
    out.update({extra: names(text) for extra, text in cfg["options.extras_require"].items()})
    return out


def imported_top_level(paths) -> set:
    """Top-level module names the files import (at any depth in the file), minus the standard library."""
    mods = set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods.add(node.module.split(".")[0])
    return mods - set(sys.stdlib_module_names)


def test_every_third_party_import_of_the_library_and_tests_is_declared():
    reqs = requirements()
    declared = set().union(*reqs.values()) - {"diffjax"}
    dists = importlib.metadata.packages_distributions()
    files = glob.glob(os.path.join(ROOT, "diffjax", "**", "*.py"), recursive=True) + \
        glob.glob(os.path.join(ROOT, "tests", "*.py"))
    local = {"diffjax", "experiments"} | {os.path.splitext(os.path.basename(p))[0] for p in  # repo files run as scripts
                                          glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)}
    undeclared = {}
    for mod in imported_top_level(files) - local:
        names = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
        if not names & declared:
            undeclared[mod] = sorted(names)
    assert not undeclared, f"imported but not in setup.cfg: {undeclared}"
    # the test extra carries everything the suite needs, training included
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    assert "diffjax[train]" in cfg["options.extras_require"]["test"].split()


def test_core_requirements_hold_no_train_only_package():
    core = requirements()["core"]
    dists = importlib.metadata.packages_distributions()
    train_dists = {d.lower().replace("_", "-") for m in TRAIN_ONLY for d in dists.get(m, [m])}
    assert not core & train_dists, core & train_dists


def test_import_diffjax_loads_no_train_only_package():
    """The core install works: ``import diffjax`` in a fresh interpreter imports none of the train extra."""
    code = ("import sys, diffjax\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({TRAIN_ONLY!r})))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"import diffjax loaded {out.stdout.strip()}"

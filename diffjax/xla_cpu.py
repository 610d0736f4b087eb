"""XLA:CPU compiler flags that diffjax sets on import (before JAX starts its CPU backend).

jaxlib 0.10 lowers every convolution on CPU to a YNNPACK fusion (``__ynn_fusion`` in the
compiled HLO). Its weight-gradient convolutions (window = the whole feature map, 3x3 output)
ran at ~16 GFLOP/s in the U-Net train step here (2-core AMD EPYC, AVX2), and the 3x3 forward at
~80; XLA's Eigen convolution path, which ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK
fusions) restores, ran a 3x3 conv forward + backward 2.4-5x faster (32x32x64, batch 32: 175 ms
-> 33 ms) and the whole train step of ``experiments/bench_train.py`` 1.35-1.5x faster.
``experiments/xla_cpu_flags.py`` re-measures both on the machine at hand.

Rules, so that importing diffjax never surprises:
  * applied only to jaxlib 0.10.x, the versions it was measured on (XLA aborts the process on a
    flag it does not know, so an untested jaxlib gets nothing);
  * a flag the user already put in ``XLA_FLAGS`` (any value) is left as the user set it;
  * ``DIFFJAX_XLA_CPU_FLAGS=0`` turns it off;
  * it only changes ``os.environ["XLA_FLAGS"]``: once a JAX backend is running it has no
    effect on this process (``status()`` says so) and only reaches child processes.
The flags touch the CPU backend only; GPU and TPU ignore them.
"""

from __future__ import annotations

import os

__all__ = ["CPU_FLAGS", "apply", "status"]

# flag -> value; "" means an empty list: no YNNPACK fusions, convolutions and dots use XLA's own
# (Eigen) kernels
CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": ""}
TESTED_JAXLIB = ((0, 10), (0, 11))  # [low, high) as (major, minor)
OPT_OUT = "DIFFJAX_XLA_CPU_FLAGS"

_applied: dict = {}
_state = {"late": True, "at_import": ""}


def _jaxlib_version() -> tuple:
    try:
        from importlib.metadata import version

        parts = version("jaxlib").split(".")
        return int(parts[0]), int(parts[1])
    except Exception:  # not installed the usual way: do not guess
        return (-1, -1)


def _backend_running() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:
        return False


def apply(environ=None) -> dict:
    """Append the CPU flags to ``XLA_FLAGS`` where the rules above allow; returns the flags added."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return {}
    low, high = TESTED_JAXLIB
    if not low <= _jaxlib_version() < high:
        return {}
    current = env.get("XLA_FLAGS", "")
    present = {tok.split("=", 1)[0] for tok in current.split()}
    added = {k: v for k, v in CPU_FLAGS.items() if k not in present}
    if added:
        env["XLA_FLAGS"] = " ".join([current.strip()] + [f"{k}={v}" for k, v in added.items()]).strip()
    if environ is None:
        _applied.update(added)
        _state["late"] = _backend_running()
        _state["at_import"] = env.get("XLA_FLAGS", "")
    return added


def status() -> dict:
    """The flags diffjax added here, whether all of CPU_FLAGS reached this process's backend, XLA_FLAGS, jaxlib.

    ``in_effect``: XLA_FLAGS held every flag of CPU_FLAGS with its value when diffjax was imported
    (added then, or inherited, e.g. from a parent process that imported diffjax) and no backend
    had started yet.
    """
    tokens = set(_state["at_import"].split())
    present = all(f"{k}={v}" in tokens for k, v in CPU_FLAGS.items())
    return {"added_by_diffjax": dict(_applied), "in_effect": present and not _state["late"],
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jaxlib": ".".join(map(str, _jaxlib_version()))}

"""XLA:CPU compiler flags and glibc malloc options that diffjax sets on import (before JAX starts its CPU backend).

1. Compiler flags (``CPU_FLAGS``, appended to ``XLA_FLAGS``).

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

2. malloc options (``MALLOC_OPTIONS``, glibc's ``mallopt``; ``apply_malloc``). XLA:CPU allocates one
temporary buffer per execution of a compiled program for all its intermediates and frees it at
the end. glibc serves a block above its mmap threshold (at most 32 MiB), and one above 64 MiB in a
thread's own arena always, with a fresh ``mmap`` and ``munmap``s it on free: every step then
page-faults its whole temporary buffer back in, zero-filled. Measured with ``getrusage``
(``experiments/malloc_tune.py``): ~31,700 minor faults and ~80 ms of kernel CPU per train step of
bench_train's size A (the digits U-Net), ~84,000 at size B. With one arena, no mmap and a 1 GiB
trim threshold the buffer stays in the heap and is handed out again: no faults after the first
few steps; the train step 1.05x (A) and 1.13x (B) faster, the bare forward + backward 1.11x / 1.18x
(medians of 3 alternating process pairs, 2-core EPYC, BENCHMARKS.md "glibc malloc options"). The
cost: freed memory up to 1 GiB stays with the process (as with tcmalloc or jemalloc): peak resident
memory of that benchmark's processes (two compiled programs each) +11% at A, +29% (+0.5 GB) at B;
all threads share one arena; and the heap can take a few calls to settle (in a toy program whose
100 MB intermediate was its only large block, resident memory grew to ~1.1 GB over 8 calls, then held).
Rules: Linux with glibc only; nothing if ``DIFFJAX_MALLOC_TUNE=0`` or if the user set glibc malloc
options in the environment (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_MAX_``, ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, or ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``); nothing once a JAX
backend is running (its threads already own arenas).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["CPU_FLAGS", "MALLOC_OPTIONS", "apply", "apply_malloc", "status"]

# flag -> value; "" means an empty list: no YNNPACK fusions, convolutions and dots use XLA's own
# (Eigen) kernels
CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": ""}
TESTED_JAXLIB = ((0, 10), (0, 11))  # [low, high) as (major, minor)
OPT_OUT = "DIFFJAX_XLA_CPU_FLAGS"

# glibc mallopt parameter -> value (malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_MAX -4, M_ARENA_MAX -8)
MALLOC_OPTIONS = {"M_ARENA_MAX": 1, "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 1 << 30}
_MALLOPT = {"M_TRIM_THRESHOLD": -1, "M_MMAP_MAX": -4, "M_ARENA_MAX": -8}
MALLOC_OPT_OUT = "DIFFJAX_MALLOC_TUNE"
MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: dict = {}
_state = {"late": True, "at_import": "", "malloc": {}, "malloc_skipped": "not applied yet"}


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
    if _off(env.get(OPT_OUT, "1")):
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


def _off(value) -> bool:
    return str(value).strip().lower() in ("0", "false", "no", "off")


def _malloc_skip_reason(env) -> str:
    """Why the malloc options must not be set here, or "" when they may."""
    if _off(env.get(MALLOC_OPT_OUT, "1")):
        return f"{MALLOC_OPT_OUT}={env[MALLOC_OPT_OUT]}"
    user = [k for k in MALLOC_ENV if k in env]
    if "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        return "malloc options set by the user: " + ", ".join(user)
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return f"not Linux with glibc ({sys.platform}, {platform.libc_ver()[0] or 'unknown libc'})"
    return ""


def apply_malloc(environ=None, mallopt=None) -> dict:
    """Set ``MALLOC_OPTIONS`` with glibc's mallopt where the rules above allow; returns those set.

    ``environ``/``mallopt`` replace ``os.environ`` and libc's ``mallopt`` (tests); with the defaults
    the outcome is recorded for ``status()``.
    """
    env = os.environ if environ is None else environ
    reason = _malloc_skip_reason(env)
    if not reason and environ is None and _backend_running():
        reason = "a JAX backend was already running (its threads own malloc arenas)"
    done = {}
    if not reason:
        if mallopt is None:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        for name, value in MALLOC_OPTIONS.items():
            if mallopt(_MALLOPT[name], value) == 1:  # mallopt returns 1 on success
                done[name] = value
        if len(done) != len(MALLOC_OPTIONS):
            reason = "mallopt refused " + ", ".join(sorted(set(MALLOC_OPTIONS) - set(done)))
    if environ is None:
        _state["malloc"], _state["malloc_skipped"] = dict(done), reason
    return done


def status() -> dict:
    """The flags diffjax added here, whether all of CPU_FLAGS reached this process's backend, XLA_FLAGS, jaxlib.

    ``in_effect``: XLA_FLAGS held every flag of CPU_FLAGS with its value when diffjax was imported
    (added then, or inherited, e.g. from a parent process that imported diffjax) and no backend
    had started yet. ``malloc``: the mallopt options set by ``apply_malloc`` ({} if none);
    ``malloc_skipped``: why not ("" when they were set).
    """
    tokens = set(_state["at_import"].split())
    present = all(f"{k}={v}" in tokens for k, v in CPU_FLAGS.items())
    return {"added_by_diffjax": dict(_applied), "in_effect": present and not _state["late"],
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jaxlib": ".".join(map(str, _jaxlib_version())),
            "malloc": dict(_state["malloc"]), "malloc_skipped": _state["malloc_skipped"]}

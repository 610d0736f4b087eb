"""XLA:CPU tuning for diffjax's entry points: one compiler flag and glibc malloc options, set by an explicit call.

``import diffjax`` changes nothing global. A program that trains or samples on CPU calls ``tune()`` before
anything starts a JAX backend (the CLIs ``python -m diffjax.main`` / ``diffjax.generate`` and the test suite do);
``python -m diffjax.xla_cpu`` prints the same settings as environment variables for launch scripts. Where JAX
runs on GPU or TPU neither setting has any effect on the accelerator.

1. Compiler flags (``CPU_FLAGS``, appended to ``XLA_FLAGS``): ``--xla_cpu_experimental_ynn_fusion_type=`` turns
   off jaxlib 0.10's YNNPACK fusions, so convolutions and dots run on XLA's Eigen kernels, which ran the U-Net
   train step faster here (BENCHMARKS.md, "XLA:CPU flags"). Rules: applied only to the jaxlib versions it was
   measured on (XLA aborts on a flag it does not know); a flag the user already put in ``XLA_FLAGS`` is left as
   set; ``DIFFJAX_XLA_CPU_FLAGS=0`` turns it off; it only changes ``os.environ["XLA_FLAGS"]``, so once a backend is
   running it reaches only child processes (``status()`` says so).

2. malloc options (``MALLOC_OPTIONS``, glibc ``mallopt``): XLA:CPU allocates one temporary buffer per execution
   of a compiled program; with glibc's defaults a large one is ``mmap``-ed and unmapped every call, so each step
   page-faults it back in. One arena, no mmap and a 1 GiB trim threshold keep it in the heap
   (BENCHMARKS.md, "glibc malloc options"); the cost is that up to 1 GiB of freed memory stays with the process
   and all threads share one arena. Rules: Linux with glibc only; nothing if ``DIFFJAX_MALLOC_TUNE=0`` or if the
   user set glibc malloc options in the environment; nothing once a JAX backend is running (its threads already
   own arenas).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["CPU_FLAGS", "MALLOC_OPTIONS", "tune", "apply", "apply_malloc", "environment", "status"]

# flag -> value; "" means an empty list: no YNNPACK fusions, convolutions and dots use XLA's own
# (Eigen) kernels
CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": ""}
TESTED_JAXLIB = ((0, 10), (0, 11))  # [low, high) as (major, minor)
OPT_OUT = "DIFFJAX_XLA_CPU_FLAGS"

# glibc mallopt parameter -> value (malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_MAX -4, M_ARENA_MAX -8)
MALLOC_OPTIONS = {"M_ARENA_MAX": 1, "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 1 << 30}
_MALLOPT = {"M_TRIM_THRESHOLD": -1, "M_MMAP_MAX": -4, "M_ARENA_MAX": -8}
# the same options as glibc reads them from the environment at process start (mallopt(3))
_MALLOC_ENV_NAME = {"M_ARENA_MAX": "MALLOC_ARENA_MAX", "M_MMAP_MAX": "MALLOC_MMAP_MAX_",
                    "M_TRIM_THRESHOLD": "MALLOC_TRIM_THRESHOLD_"}
MALLOC_OPT_OUT = "DIFFJAX_MALLOC_TUNE"
MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: dict = {}
_state = {"late": True, "at_tune": "", "malloc": {}, "malloc_skipped": "tune() not called"}


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
        _state["at_tune"] = env.get("XLA_FLAGS", "")
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


def tune() -> dict:
    """Set the XLA:CPU flags and glibc malloc options in this process; call before JAX starts a backend.

    Returns ``{"flags": <flags added to XLA_FLAGS>, "malloc": <mallopt options set>}``; ``status()`` says
    whether they reached the backend and, for malloc, why not where they were skipped.
    """
    return {"flags": apply(), "malloc": apply_malloc()}


def environment() -> dict:
    """The same settings as environment variables (``XLA_FLAGS`` and glibc's ``MALLOC_*_``), for launch scripts.

    ``XLA_FLAGS`` carries the current value with ``CPU_FLAGS`` appended (nothing on an untested jaxlib).
    """
    env = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    apply(env)
    env.update({_MALLOC_ENV_NAME[k]: str(v) for k, v in MALLOC_OPTIONS.items()})
    return {k: v for k, v in env.items() if v}


def status() -> dict:
    """The flags diffjax added here, whether all of CPU_FLAGS reached this process's backend, XLA_FLAGS, jaxlib.

    ``in_effect``: XLA_FLAGS held every flag of CPU_FLAGS with its value when ``tune()`` ran (added
    then, or inherited, e.g. from a parent process) and no backend had started yet. ``malloc``: the mallopt options set by ``apply_malloc`` ({} if none);
    ``malloc_skipped``: why not ("" when they were set).
    """
    tokens = set(_state["at_tune"].split())
    present = all(f"{k}={v}" in tokens for k, v in CPU_FLAGS.items())
    return {"added_by_diffjax": dict(_applied), "in_effect": present and not _state["late"],
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jaxlib": ".".join(map(str, _jaxlib_version())),
            "malloc": dict(_state["malloc"]), "malloc_skipped": _state["malloc_skipped"]}


if __name__ == "__main__":  # launch scripts: eval "$(python -m diffjax.xla_cpu)"
    import shlex

    for name, value in environment().items():
        print(f"export {name}={shlex.quote(value)}")

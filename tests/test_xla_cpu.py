"""diffjax.xla_cpu: the explicit XLA:CPU tuning call (compiler flags, glibc malloc options)."""

import os

import pytest

def test_xla_cpu_flags_rules(monkeypatch):
    from diffjax import xla_cpu

    flag = next(iter(xla_cpu.CPU_FLAGS))
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 10))
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_cpu.apply(env) == xla_cpu.CPU_FLAGS
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", f"{flag}="]
    assert xla_cpu.apply(env) == {} and env["XLA_FLAGS"].count(flag) == 1  # idempotent
    env = {"XLA_FLAGS": f"{flag}=individual_convolution"}  # the user's own value wins
    assert xla_cpu.apply(env) == {} and env["XLA_FLAGS"] == f"{flag}=individual_convolution"
    env = {xla_cpu.OPT_OUT: "0"}
    assert xla_cpu.apply(env) == {} and "XLA_FLAGS" not in env
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 9))  # untested jaxlib: nothing
    env = {}
    assert xla_cpu.apply(env) == {} and env == {}


def test_xla_cpu_flags_in_effect_here():
    """conftest.py called ``tune()`` before starting JAX, so on jaxlib 0.10 the flags reached XLA."""
    from diffjax import xla_cpu

    st = xla_cpu.status()
    if st["jaxlib"].startswith("0.10") and not os.environ.get(xla_cpu.OPT_OUT):
        assert st["in_effect"], st
        assert all(f"{k}={v}" in st["xla_flags"] for k, v in xla_cpu.CPU_FLAGS.items())


def test_malloc_options_rules(monkeypatch):
    from diffjax import xla_cpu

    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    monkeypatch.setattr(xla_cpu.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(xla_cpu.sys, "platform", "linux")
    assert xla_cpu.apply_malloc({}, mallopt) == xla_cpu.MALLOC_OPTIONS
    assert calls == [(-8, 1), (-4, 0), (-1, 1 << 30)]  # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD
    for env in ({xla_cpu.MALLOC_OPT_OUT: "0"}, {"MALLOC_ARENA_MAX": "4"}, {"MALLOC_MMAP_THRESHOLD_": "1"},
                {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}):
        calls.clear()
        assert xla_cpu.apply_malloc(env, mallopt) == {} and calls == [], env
        assert xla_cpu._malloc_skip_reason(env)
    assert xla_cpu.apply_malloc({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, mallopt) == xla_cpu.MALLOC_OPTIONS
    assert xla_cpu.apply_malloc({}, lambda p, v: int(p != -8)) == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 1 << 30}
    monkeypatch.setattr(xla_cpu.platform, "libc_ver", lambda: ("", ""))  # musl, macOS, ...: nothing
    calls.clear()
    assert xla_cpu.apply_malloc({}, mallopt) == {} and calls == []
    assert "glibc" in xla_cpu._malloc_skip_reason({})


_FAULTS_SCRIPT = """
import json, os, resource
import diffjax  # changes nothing by itself
from diffjax import xla_cpu
if os.environ.get("TUNE") == "1":
    xla_cpu.tune()  # before JAX starts: the malloc options (and the compiler flag)
import jax, jax.numpy as jnp
x = jnp.linspace(0.0, 1.0, 5000)
f = jax.jit(lambda x: jnp.outer(x, jnp.sin(x)) @ x)  # the 5000 x 5000 outer product is materialised for the dot
for _ in range(30):  # the heap grows by one buffer per call until it holds ~1 GiB (the trim threshold),
    jax.block_until_ready(f(x))  # then hands blocks out again: ~10-13 calls here
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    jax.block_until_ready(f(x))
print(json.dumps(dict(faults=(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 3,
                      malloc=xla_cpu.status()["malloc"])))
"""


def test_malloc_options_keep_xla_temp_buffer_resident():
    """A program whose ~100 MB intermediate lives in XLA:CPU's per-execution temporary buffer page-faults it in
    at every call with glibc's defaults, and not after ``tune()``; ``import diffjax`` alone leaves glibc's
    defaults (the faults show it, not only diffjax's own bookkeeping).

    Each setting runs in a fresh process (diffjax imported before JAX starts, as the options need): in a
    test worker that has already compiled and freed hundreds of programs, where the buffer lands in the
    heap depends on what ran before."""
    import json
    import subprocess
    import sys

    from diffjax import xla_cpu

    def faults(**env):
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **env})
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    env = {k: v for k, v in os.environ.items() if k != xla_cpu.MALLOC_OPT_OUT}
    if xla_cpu._malloc_skip_reason(env):
        pytest.skip(f"malloc options not applicable here: {xla_cpu._malloc_skip_reason(env)}")
    on = faults(**{xla_cpu.MALLOC_OPT_OUT: "1", "TUNE": "1"})
    assert on["malloc"] == xla_cpu.MALLOC_OPTIONS, on
    off = faults(**{xla_cpu.MALLOC_OPT_OUT: "1", "TUNE": "0"})  # import alone sets nothing
    assert off["malloc"] == {}, off
    # 100 MB in fresh 4 KiB pages is ~24,400 faults per call
    assert on["faults"] < 2000 and off["faults"] > 10000, (on, off)


_IMPORT_SCRIPT = """
import json, os, sys
before = dict(os.environ)
import jax
config_before = {k: repr(v) for k, v in jax.config.values.items()}
import diffjax, diffjax.main, diffjax.generate
import diffjax.likelihood, diffjax.guidance, diffjax.models, diffjax.training
from diffjax import xla_cpu
after = dict(os.environ)
config_after = {k: repr(v) for k, v in jax.config.values.items()}
print(json.dumps(dict(env_changed=sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)),
                      config_changed=sorted(k for k in config_before if config_before[k] != config_after.get(k)),
                      backend_running=xla_cpu._backend_running(), malloc=xla_cpu.status()["malloc"])))
"""


def test_import_changes_nothing_global():
    """``import diffjax`` (and its CLIs' modules) in a fresh process leaves os.environ, every JAX setting and
    malloc alone, and starts no backend; the CPU tuning is the explicit ``tune()``."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == dict(env_changed=[], config_changed=[], backend_running=False, malloc={}), got


def test_environment_for_launch_scripts(monkeypatch):
    from diffjax import xla_cpu

    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 10))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    env = xla_cpu.environment()
    flag = next(iter(xla_cpu.CPU_FLAGS))
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {flag}="
    assert env["MALLOC_ARENA_MAX"] == "1" and env["MALLOC_MMAP_MAX_"] == "0"
    assert env["MALLOC_TRIM_THRESHOLD_"] == str(1 << 30)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"  # reported, not set

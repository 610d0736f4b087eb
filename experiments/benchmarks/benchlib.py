"""Shared by the benchmark scripts: result blocks in BENCHMARKS.md, machine-load accounting."""

from __future__ import annotations

import os
import time

import jax

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "BENCHMARKS.md")


def markers(name):
    return f"<!-- {name}-results:begin -->", f"<!-- {name}-results:end -->"


def parse_sizes(ap, text: str, known) -> list:
    """``--sizes`` "A,B" -> ["A", "B"]; an empty list or a size not in ``known`` is an argparse error naming it."""
    sizes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in known]
    if unknown or not sizes:
        ap.error(f"--sizes: unknown {unknown or text!r}; known: {sorted(known)}")
    return sizes


def write_section(name: str, text: str, command: str):
    """Replace the block of BENCHMARKS.md between ``name``'s markers with ``text``, stamped."""
    begin, end = markers(name)
    doc = open(BENCHMARKS).read()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{BENCHMARKS} lacks the {name} result markers")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    stamp = (f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `{command}`, "
             f"{os.cpu_count()} CPU cores, jax {jax.__version__}.")
    with open(BENCHMARKS, "w") as f:
        f.write(head + begin + "\n" + stamp + "\n\n" + text + "\n" + end + tail)


def machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (all cores; /proc/stat), NaN if unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return float("nan")

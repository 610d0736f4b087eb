"""README.md's Python snippets run as written: each ```python block executes in a fresh interpreter.

Each block is one program: it runs alone (nothing carries over from the blocks above it) in a new
``python`` process whose working directory is a temporary directory holding a symlink to every
top-level entry of the repository, so that paths such as ``experiments/configs/digits.py`` resolve
as from the repo root while files a snippet writes (``runs/...``) land in the temporary directory.
A block fails the test when its process exits non-zero (an uncaught exception does) or runs past
``TIMEOUT_S``.

A block that is not meant to run (a signature overview, a fragment with placeholders) is fenced as
```python no-run; every other ```python block runs. Other languages (```bash, ```text) are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import NamedTuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
NO_RUN = "no-run"
TIMEOUT_S = 300

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)(?P<info>.*)$")


class Snippet(NamedTuple):
    line: int  # 1-based line of the opening fence
    info: str  # the fence's info string, e.g. "python" or "python no-run"
    code: str

    @property
    def runs(self) -> bool:
        words = self.info.split()
        return bool(words) and words[0] == "python" and NO_RUN not in words[1:]


def fenced_blocks(markdown: str) -> list[Snippet]:
    """Every fenced code block of ``markdown`` (CommonMark fences: ``` or ~~~, closed by a fence at least as long)."""
    blocks, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start, body = m["fence"], i, []
        i += 1
        while i < len(lines):
            close = _FENCE.match(lines[i])
            if close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence) and not close["info"].strip():
                break
            body.append(lines[i][len(m["indent"]):] if lines[i].startswith(m["indent"]) else lines[i].lstrip())
            i += 1
        else:
            raise ValueError(f"README.md: the code block opened on line {start + 1} is never closed")
        blocks.append(Snippet(start + 1, m["info"].strip(), "\n".join(body) + "\n"))
        i += 1
    return blocks


def readme_snippets() -> list[Snippet]:
    with open(README, encoding="utf-8") as f:
        return [b for b in fenced_blocks(f.read()) if b.runs]


def run_snippet(code: str, workdir: str, timeout_s: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``code`` as a fresh ``python`` program in ``workdir``, which mirrors the repo root by symlinks."""
    for name in os.listdir(ROOT):
        if not name.startswith(".") and not os.path.exists(os.path.join(workdir, name)):
            os.symlink(os.path.join(ROOT, name), os.path.join(workdir, name))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    path = os.path.join(workdir, "snippet.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(code)
    return subprocess.run([sys.executable, path], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def test_fenced_blocks_finds_runnable_python_and_honours_no_run():
    md = ("text\n```python\nx = 1\n```\n```python no-run\nf(x, ...)\n```\n```bash\nls\n```\n"
          "````python\n```\nstill inside\n````\n")
    blocks = fenced_blocks(md)
    assert [(b.line, b.info, b.runs) for b in blocks] == [
        (2, "python", True), (5, "python no-run", False), (8, "bash", False), (11, "python", True)]
    assert blocks[0].code == "x = 1\n" and blocks[3].code == "```\nstill inside\n"
    with pytest.raises(ValueError, match="line 2"):
        fenced_blocks("a\n```python\nx = 1\n")


def test_run_snippet_fails_on_a_raising_snippet_and_writes_in_its_workdir(tmp_path):
    ok = run_snippet("import os\nopen('out.txt', 'w').write('hi')\nassert os.path.isdir('experiments/configs')\n",
                     str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out.txt").read_text() == "hi" and not os.path.exists(os.path.join(ROOT, "out.txt"))
    bad = run_snippet("raise ValueError('boom')\n", str(tmp_path))
    assert bad.returncode != 0 and "ValueError: boom" in bad.stderr


def test_readme_has_runnable_snippets():
    assert readme_snippets(), "README.md has no ```python block that runs (all are no-run?)"


@pytest.mark.parametrize("snippet", readme_snippets(), ids=lambda s: f"README.md:{s.line}")
def test_readme_snippet_runs(snippet, tmp_path):
    res = run_snippet(snippet.code, str(tmp_path))
    assert res.returncode == 0, (f"README.md line {snippet.line}: the snippet exited {res.returncode}\n"
                                 f"{snippet.code}\n--- stderr (tail) ---\n{res.stderr[-4000:]}")

"""The README runs as written: its python blocks (in order, in one fresh interpreter), its shell blocks, and
its first shell block is what CI runs (set-up, then the tests)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", re.M | re.S)


def blocks(lang=None) -> list:
    found = [(m.group(1), m.group(2)) for m in FENCE.finditer(README.read_text())]
    return [code for tag, code in found if lang is None or tag == lang]


def _commands(code: str) -> list:
    return [line.split("#")[0].strip() for line in code.splitlines() if line.split("#")[0].strip()]


def test_every_block_says_its_language():
    tags = [m.group(1) for m in FENCE.finditer(README.read_text())]
    assert tags and all(t in ("python", "bash", "text") for t in tags), tags


def test_first_shell_block_is_what_ci_runs():
    """The README's first commands are set-up, (the main job,) and the tests; CI runs the same ones."""
    first = _commands(blocks("bash")[0])
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert first[0] == "bash scripts/dev_setup.sh" and any(c == first[0] for c in ci)
    test_cmd = first[-1]
    assert test_cmd.startswith(".venv/bin/python -m pytest")
    assert any(c.startswith(test_cmd) for c in ci), (test_cmd, ci)  # CI may add reporting flags


def test_python_blocks_run_in_order(tmp_path):
    script = "\n\n".join(blocks("python"))
    assert script
    path = tmp_path / "readme_blocks.py"
    path.write_text(script)
    res = subprocess.run([sys.executable, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.parametrize("code", blocks("bash")[1:], ids=lambda c: _commands(c)[0][:40])
def test_other_shell_blocks_run(code):
    bindir = pathlib.Path(sys.executable).parent
    for cmd in _commands(code):
        cmd = re.sub(r"^\.venv/bin/", f"{bindir}/", cmd)
        res = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-2000:])

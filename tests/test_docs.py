"""Docs match code: every config key is documented in the README, the README starts with its two
commands, and .ci/run runs the README's test command.

Run: .venv/bin/python -m pytest -q tests/test_docs.py
"""
import dataclasses
import typing
from pathlib import Path

import pytest

from d2v.config import Config

ROOT = Path(__file__).resolve().parent.parent


def config_keys(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            yield from config_keys(t, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_config_key_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in config_keys() if f"| `{k}` |" not in readme]
    assert missing == []


def test_readme_starts_with_main_and_test_commands_and_ci_runs_the_tests():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1:lines.index("```")]
    assert [ln.split("#")[0].strip() for ln in block] == ["bash scripts/main.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_shipped_files_cite_no_private_paths():
    """Users get the package, README and docs, not the developers' notes: nothing shipped points at them."""
    import subprocess

    files = subprocess.run(["git", "ls-files", "d2v", "kernels", "docs", "README.md"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    bad = [f for f in files if (ROOT / f).is_file() and not (ROOT / f).is_symlink()
           and f.endswith((".py", ".md", ".yaml", ".cpp", ".h", ".cu"))
           and "../shared/" in (ROOT / f).read_text(errors="replace")]
    assert not bad, bad

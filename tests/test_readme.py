"""The README is the front door: what it tells a new user to run is what CI runs, and its links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks_after(heading: str) -> list[str]:
    """The bash blocks of the README section under ``heading``."""
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def _commands(block: str) -> list[str]:
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_s_set_up_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    set_up = _commands(_blocks_after("Set up")[0])
    test, full_run = _blocks_after("Test")[:2]
    ci_lines = [line.replace("--quiet ", "") for line in ci.splitlines()]
    for command in set_up:
        assert command in ci_lines, f"README's {command!r} is not what .ci/run runs"
    [test_command] = _commands(test)
    assert any(line == test_command or line.endswith(" " + test_command) for line in ci_lines), test_command
    for command in _commands(full_run)[1:]:  # the apt line is guarded in .ci/run
        assert command in ci_lines, f"README's full run {command!r} is not what .ci/run runs"


def test_the_readme_is_short_and_its_links_exist():
    assert len(README.splitlines()) <= 300
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README):
        assert (ROOT / target).exists(), target
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name}: {target}"

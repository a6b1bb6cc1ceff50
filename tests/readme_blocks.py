"""The ```bash blocks of README.md and docs/*.md as scripts a test runs: found by page and section heading, edited
only by an explicit
substitution table (every entry must match exactly once, so drift in the page fails the test) and by appending
cap overrides (epochs, steps, batch size, seeds, sample limits, workers) to every stage command."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
OPERATIONS = REPO / "docs" / "operations.md"
OWN_DATA = REPO / "docs" / "own-data.md"


def pages() -> list[Path]:
    """Every page whose commands must be run by a test: README.md and docs/*.md."""
    return [README, *sorted((REPO / "docs").glob("*.md"))]

_HEADING = re.compile(r"^(#{1,6}) (.+?)\s*$")
_FENCE = re.compile(r"^```(\w*)\s*$")
# A stage command: what `python -m pipeline.<stage>` or `stages/launch.sh <stage>` runs.
STAGE = re.compile(r"(?:\bpython -m pipeline\.|\bstages/launch\.sh )(\w+)")


@dataclass(frozen=True)
class Block:
    section: str  # the nearest heading above the block
    lang: str
    code: str
    line: int     # 1-based line of the opening fence in its page
    page: str = "README.md"


def blocks(text: str | None = None, page: Path = README) -> list[Block]:
    """Every fenced block of ``page`` (or of ``text``), with the heading it stands under."""
    lines = (page.read_text() if text is None else text).splitlines()
    name = page.relative_to(REPO).as_posix()
    out, section, i = [], "", 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        heading = _HEADING.match(lines[i])
        if fence:
            start, i = i, i + 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            out.append(Block(section, fence.group(1), "\n".join(lines[start + 1:i]) + "\n", start + 1, name))
        elif heading:
            section = heading.group(2)
        i += 1
    return out


def bash_blocks(section: str, page: Path = README) -> list[str]:
    """The ```bash blocks of ``page`` under the heading ``section`` (exactly as written)."""
    found = [b.code for b in blocks(page=page) if b.section == section and b.lang == "bash"]
    assert found, f"{page.name}: no ```bash block under the heading {section!r}"
    return found


def substitute(code: str, table: dict[str, str]) -> str:
    """``code`` with each key of ``table`` replaced by its value; each key must occur exactly once."""
    for old, new in table.items():
        n = code.count(old)
        assert n == 1, f"doc block: {old!r} occurs {n} times, the test substitutes it exactly once:\n{code}"
        code = code.replace(old, new)
    return code


def _logical_lines(code: str) -> list[list[str]]:
    """Physical lines grouped into shell logical lines (a trailing backslash continues a line)."""
    groups, current = [], []
    for line in code.splitlines():
        current.append(line)
        if not line.endswith("\\"):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def _code_end(line: str) -> int:
    """Where a line's command ends: before an unquoted ``#`` comment (trailing blanks too), or before the closing
    quote of a ``bash -c '...'`` that ends the line."""
    quote, end = None, len(line)
    for j, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (j == 0 or line[j - 1].isspace()):
            end = j
            break
    code = line[:end].rstrip()
    return len(code) - 1 if code.endswith("'") and "bash -c '" in line else len(code)


def add_caps(code: str, caps: str) -> tuple[str, list[str]]:
    """``code`` with `` <caps>`` appended to every stage command (every logical line that is not a comment and runs
    ``python -m pipeline.<stage>`` or ``stages/launch.sh <stage>``); returns the script and the stages hit.
    A line with two stage commands is refused (the caps would reach only one)."""
    out, hit = [], []
    for group in _logical_lines(code):
        joined = " ".join(group)
        stages = STAGE.findall(joined[:_code_end(joined)]) if not joined.lstrip().startswith("#") else []
        assert len(stages) <= 1, f"doc block: two stage commands on one line: {joined!r}"
        if stages:
            last = group[-1]
            cut = _code_end(last)
            group = [*group[:-1], f"{last[:cut]} {caps}{last[cut:]}"]
            hit.append(stages[0])
        out.extend(group)
    # The rule reached every stage command of the block: none is left without the caps.
    assert len(hit) == len([m for g in _logical_lines(code) for m in STAGE.findall(" ".join(g))
                            if not " ".join(g).lstrip().startswith("#")]), code
    return "\n".join(out) + "\n", hit


def node_script(code: str, node: int) -> str:
    """A per-node block (plain torchrun): the lines marked ``# on node<k>`` run on node k only, the others on every
    node."""
    keep = []
    for line in code.splitlines():
        mark = re.search(r"#\s*on node(\d+)\b", line)
        if mark is None or int(mark.group(1)) == node:
            keep.append(line)
    return "\n".join(keep) + "\n"


def copy_checkout(dest: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """A copy of this checkout as git sees it (tracked and untracked, not ignored files), but the paths starting
    with one of ``leave_out``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in files:
        src = REPO / f
        if f and src.is_file() and not src.is_symlink() and not f.startswith(leave_out):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest

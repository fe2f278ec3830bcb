"""Write one benchmark's table into docs/benchmarks.md between its own markers."""

from __future__ import annotations

import platform
import re
from datetime import UTC, datetime
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nWritten by `make bench` (`bench/*.py`). Each section compares against a peer or a ceiling measured in the same run; absolute numbers on shared 2-core machines are noisy, the ratios are what matter.\n"


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section `name` of docs/benchmarks.md with `body`."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"_Run {stamp} on {platform.machine()}, Python {platform.python_version()}._\n\n"
        f"{body.strip()}\n<!-- /bench:{name} -->"
    )
    text = DOC.read_text() if DOC.exists() else HEADER
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S
    )
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section + "\n"
    )
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_part(name: str, part: str, body: str) -> bool:
    """Replace the part ``part`` inside section ``name`` of docs/benchmarks.md (between
    ``<!-- bench:name:part -->`` markers); False, writing nothing, when it is not there."""
    text = DOC.read_text() if DOC.exists() else ""
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)}:{re.escape(part)} -->.*?"
        rf"<!-- /bench:{re.escape(name)}:{re.escape(part)} -->",
        re.S,
    )
    if not pattern.search(text):
        return False
    DOC.write_text(pattern.sub(lambda _: marked(name, part, body), text))
    return True


def marked(name: str, part: str, body: str) -> str:
    """``body`` between the markers of part ``part`` of section ``name`` (see write_part)."""
    return f"<!-- bench:{name}:{part} -->\n{body.strip()}\n<!-- /bench:{name}:{part} -->"

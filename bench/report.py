"""Writing a benchmark's figures into its own section of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(name: str, section: str, doc: Path = DOC) -> None:
    """Replace the text between `<!-- NAME: begin -->` and `<!-- NAME: end -->` (or append it)."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    body = f"{begin}\n{section}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    doc.write_text(text)

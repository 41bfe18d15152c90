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


def verdicts(checks: list[tuple[str, str, bool]], heading: str = "target") -> list[str]:
    """A markdown table of targets: what, the measured value, met or missed."""
    lines = ["", f"| {heading} | measured | verdict |", "| --- | --- | --- |"]
    return lines + [f"| {what} | {value} | {'met' if ok else 'missed'} |" for what, value, ok in checks]

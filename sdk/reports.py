"""Report writing shared by every report of the project (benchmarks, analyses, load tests): one
Markdown table builder and one writer of the ``report.json`` + ``report.md`` pair.

Plain Python: the light SDK's auditors and the research analyses use the same helpers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = ["markdown_table", "write_report"]


_RULES = {None: "---", "l": ":--", "r": "--:", "c": ":-:"}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """A GitHub Markdown table as lines: the header, the rule, one line per row (cells are
    ``str()``-ed; format numbers before passing them). ``align``: one letter per column, ``l``,
    ``r`` or ``c``; default: none stated."""
    rule = [_RULES[a] for a in align] if align else [_RULES[None]] * len(header)
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "".join(r + "|" for r in rule)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_report(out_dir, report: dict, markdown: str, *, default: Callable | None = None,
                 allow_nan: bool = True, indent: int = 2) -> Path:
    """Write ``report.json`` (indented) and ``report.md`` to ``out_dir`` (created if missing) and
    return the folder. ``default`` converts values JSON does not know (numpy scalars, paths)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=indent, default=default, allow_nan=allow_nan))
    (out / "report.md").write_text(markdown)
    return out


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (reports never open a window); imported
    here, on first use, so that the SDK does not need matplotlib to load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 110) -> None:
    """Lay ``fig`` out, write it to ``path`` and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)

"""Tables that fit the terminal without losing a digit: every command's results table goes through here.

Rich shrinks a table that is wider than the terminal by cutting cells ("162.91…"), which loses
exactly the numbers a user ran the command for. :func:`print_table` never lets that happen:

* number cells never wrap and their column is never narrower than its widest number;
* headers and text cells wrap at spaces, and a word longer than :data:`MAX_WORD` folds onto the
  next line (a label may wrap; a number may not);
* when even that is too wide (many columns on 80), the columns are split over several tables
  stacked vertically, each repeating the key column(s), like a wide data frame.

The width is the console's: the terminal's, ``COLUMNS`` when set, and 80 when the output is a
pipe (``lloptim solve | cat``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["Column", "print_table", "render_table", "MAX_WORD"]

#: Longest word of a text cell kept whole; longer ones (identifiers) fold.
MAX_WORD = 16
GAP = 2  # characters between two columns: one of padding, one of the (blank) divider of the box


@dataclass(frozen=True)
class Column:
    """One column of a results table.

    Attributes
    ----------
    header
        The header; it may wrap at spaces, so give units a word of their own (``"makespan s"``).
    numeric
        Cells are numbers: right-aligned, never wrapped, never cut.
    """

    header: str
    numeric: bool = True


def _longest_word(text: str) -> int:
    return max((len(w) for w in text.split()), default=0)


def _min_width(col: Column, cells: Sequence[str]) -> int:
    """Narrowest the column may be: its widest number, or its longest (capped) word."""
    head = min(_longest_word(col.header), MAX_WORD)
    if col.numeric:
        return max([head, 1] + [len(c) for c in cells])
    return max([head, 1] + [min(_longest_word(c), MAX_WORD) for c in cells])


def _natural_width(col: Column, cells: Sequence[str]) -> int:
    """Width of the column with nothing wrapped."""
    return max([len(col.header), 1] + [len(c) for c in cells])


def _groups(mins: list[int], width: int, keys: int) -> list[list[int]]:
    """Column indices per stacked table: the key columns, then as many others as fit ``width``."""
    key_w = sum(m + GAP for m in mins[:keys])
    groups: list[list[int]] = []
    current: list[int] = []
    used = key_w
    for j in range(keys, len(mins)):
        w = mins[j] + GAP
        if current and used + w - GAP > width:
            groups.append(current)
            current, used = [], key_w
        current.append(j)
        used += w
    if current or not groups:
        groups.append(current)
    return [list(range(keys)) + g for g in groups]


def _fit(natural: list[int], floors: list[list[int]], avail: int) -> list[int]:
    """Column widths within ``avail``: shrink in stages, the widest column first within a stage.

    ``floors[k][j]`` is how narrow column ``j`` may get in stage ``k``: first only headers wrap
    (a header costs one extra line in all), then text cells too (they cost lines on every row).
    """
    widths = list(natural)
    excess = sum(widths) - avail
    for floor in floors:
        while excess > 0:
            slack = [j for j in range(len(widths)) if widths[j] > floor[j]]
            if not slack:
                break
            j = max(slack, key=lambda k: widths[k])
            widths[j] -= 1
            excess -= 1
    return widths


def render_table(title: str | None, columns: Sequence[Column], rows: Sequence[Sequence[str]],
                 width: int, keys: int = 1) -> list[Table]:
    """The rich tables (one, or several stacked) that show ``rows`` within ``width`` characters.

    Column widths are computed here and fixed (rich's own shrinking cuts cells): each column
    starts at its natural width, and the widest ones wrap (headers, text) down to their minimum
    (:func:`_min_width`) until the table fits.

    Parameters
    ----------
    title
        Title above the first table (plain text); :func:`print_table` prints it as a line of its
        own, so it wraps at the terminal's width rather than the table's.
    columns
        The columns.
    rows
        Cells as formatted strings (plain text), one list per row.
    width
        Characters available.
    keys
        Leading columns that identify a row, repeated in every stacked table.

    Returns
    -------
    list of rich.table.Table
        Print them in order.
    """
    cells = [[str(c) for c in row] for row in rows]
    mins = [_min_width(col, [r[j] for r in cells]) for j, col in enumerate(columns)]
    natural = [max(m, _natural_width(col, [r[j] for r in cells])) for j, (m, col) in enumerate(zip(mins, columns))]
    body = [max([m] + [len(r[j]) for r in cells]) for j, m in enumerate(mins)]  # cells whole, headers wrapped
    tables = []
    for idx in _groups(mins, width, min(keys, len(columns))):
        widths = _fit([natural[j] for j in idx], [[body[j] for j in idx], [mins[j] for j in idx]],
                      width - GAP * (len(idx) - 1))
        t = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), pad_edge=False)
        for j, w in zip(idx, widths):
            col = columns[j]
            t.add_column(escape(col.header), justify="right" if col.numeric else "left", overflow="fold", width=w)
        for r in cells:
            t.add_row(*[escape(r[j]) for j in idx])
        tables.append(t)
    return tables


def print_table(console: Console, title: str | None, columns: Sequence[Column], rows: Sequence[Sequence[str]],
                keys: int = 1) -> None:
    """Print ``rows`` as one or more tables that fit ``console``'s width (see the module docstring).

    A single row too wide for one table is printed as a two-column table, one line per column
    (``makespan s   201.00``), which reads better than a row split in pieces.
    """
    tables = render_table(title, columns, rows, console.width, keys)
    if len(rows) == 1 and len(tables) > 1:
        tables = render_table(title, [Column("", numeric=False), Column("", numeric=True)],
                              [[col.header, str(v)] for col, v in zip(columns, rows[0])], console.width)
        for t in tables:
            t.show_header = False
    if title:
        console.print(escape(title))
    for k, t in enumerate(tables):
        if k:
            console.print()
        console.print(t)

"""The report as a document: sections of paragraphs, tables and figures.

The HTML and Markdown renderers both read this model, so the two files always show the same
tables. Every text here is plain text, and each renderer escapes it for its own format.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    """A table of preformatted cells, with an optional caption and a note shown below it."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""
    note: str = ""


@dataclass(frozen=True)
class FigureImage:
    """One rendered PNG figure and its file name inside the report folder."""

    file_name: str
    caption: str
    png: bytes


Block = str | Table | FigureImage


@dataclass
class Section:
    """A titled part of the report, in which each ``str`` block is one paragraph."""

    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class ReportContent:
    """The whole report: a title and its sections in order."""

    title: str
    sections: list[Section] = field(default_factory=list)

    @property
    def figures(self) -> list[FigureImage]:
        return [
            block
            for section in self.sections
            for block in section.blocks
            if isinstance(block, FigureImage)
        ]

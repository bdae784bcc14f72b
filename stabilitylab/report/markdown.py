"""Rendering of the report as Markdown, with image links to the PNG files beside it.

Cells and paragraphs are escaped so that run names and configuration values show as text.
``<``, ``>`` and ``&`` become HTML entities, because Markdown renderers pass raw HTML
through. Markdown punctuation gets a backslash, so it cannot start emphasis, a link or a
new table cell.
"""

from __future__ import annotations

from html import escape

from stabilitylab.report.content import Block, FigureImage, ReportContent, Section, Table

_MARKDOWN_PUNCTUATION = "\\`*_[]|~#"


def escape_markdown(text: str) -> str:
    """Return ``text`` as literal Markdown text on one line."""
    text = " ".join(text.splitlines())
    text = "".join(f"\\{char}" if char in _MARKDOWN_PUNCTUATION else char for char in text)
    return escape(text, quote=False)


def render_markdown(content: ReportContent) -> str:
    """Render ``content`` as a Markdown document."""
    parts = [f"# {escape_markdown(content.title)}"]
    parts.extend(render_section(section) for section in content.sections)
    return "\n\n".join(parts) + "\n"


def render_section(section: Section) -> str:
    blocks = [f"## {escape_markdown(section.title)}"]
    blocks.extend(render_block(block) for block in section.blocks)
    return "\n\n".join(blocks)


def render_block(block: Block) -> str:
    if isinstance(block, Table):
        return render_table(block)
    if isinstance(block, FigureImage):
        return f"![{escape_markdown(block.caption)}]({block.file_name})"
    return escape_markdown(block)


def render_table(table: Table) -> str:
    lines = []
    if table.caption:
        lines.extend([f"**{escape_markdown(table.caption)}**", ""])
    lines.append(_table_row(table.columns))
    lines.append("|" + "|".join(" --- " for _ in table.columns) + "|")
    lines.extend(_table_row(row) for row in table.rows)
    if table.note:
        lines.extend(["", escape_markdown(table.note)])
    return "\n".join(lines)


def _table_row(cells: tuple[str, ...]) -> str:
    return "| " + " | ".join(escape_markdown(cell) for cell in cells) + " |"

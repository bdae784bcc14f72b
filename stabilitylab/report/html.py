"""Rendering of the report as one self-contained HTML page.

Figures are embedded as base64 PNG data URIs and the style sheet is inline, so the page
refers to no other file and opens offline. Every text from the report model, which includes
run names, paths and configuration values, goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
from html import escape

from stabilitylab.report.content import Block, FigureImage, ReportContent, Section, Table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1a1a1a; line-height: 1.45; }
h1 { font-size: 1.6rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3rem; }
th, td { border: 1px solid #d4d4d4; padding: 0.25rem 0.5rem; text-align: left;
         vertical-align: top; }
th { background: #f2f2f2; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; height: auto; }
figcaption, .note { color: #555; font-size: 0.85rem; }
"""


def render_html(content: ReportContent) -> str:
    """Render ``content`` as a complete HTML document."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(content.title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{escape(content.title)}</h1>",
    ]
    parts.extend(render_section(section) for section in content.sections)
    parts.extend(["</body>", "</html>", ""])
    return "\n".join(parts)


def render_section(section: Section) -> str:
    blocks = "\n".join(render_block(block) for block in section.blocks)
    return f"<section>\n<h2>{escape(section.title)}</h2>\n{blocks}\n</section>"


def render_block(block: Block) -> str:
    if isinstance(block, Table):
        return render_table(block)
    if isinstance(block, FigureImage):
        return render_figure(block)
    return f"<p>{escape(block)}</p>"


def render_table(table: Table) -> str:
    lines = ["<table>"]
    if table.caption:
        lines.append(f"<caption>{escape(table.caption)}</caption>")
    header = "".join(f"<th>{escape(column)}</th>" for column in table.columns)
    lines.append(f"<thead><tr>{header}</tr></thead>")
    lines.append("<tbody>")
    for row in table.rows:
        cells = "".join(f"<td>{escape(cell)}</td>" for cell in row)
        lines.append(f"<tr>{cells}</tr>")
    lines.append("</tbody>")
    lines.append("</table>")
    if table.note:
        lines.append(f'<p class="note">{escape(table.note)}</p>')
    return "\n".join(lines)


def render_figure(figure: FigureImage) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    caption = escape(figure.caption)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )

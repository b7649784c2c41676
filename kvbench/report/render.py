"""The document's blocks (headings, text, tables, figures) and their two renderings, Markdown and a
self-contained HTML page: both come from the same blocks, so they can never disagree."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from markdown_it import MarkdownIt
from tabulate import tabulate

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:88em;
padding:0 1.5em;color:#1b1f24;line-height:1.45}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3em}h2{border-bottom:1px solid #d0d7de;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.88em}
th,td{border:1px solid #d0d7de;padding:.25em .6em;white-space:nowrap}th{background:#f3f5f7}
tbody tr:nth-child(even){background:#fafbfc}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td strong{color:#0a6b2c}code{background:#f3f5f7;padding:.1em .3em;border-radius:3px;font-size:.9em}
pre{background:#f3f5f7;padding:.8em;overflow-x:auto;white-space:pre-wrap}
figure{margin:.5em 0 1.5em}figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:.85em;color:#57606a}
.wide{overflow-x:auto;max-width:100%}
.side{display:flex;flex-wrap:wrap;gap:1.5em}.side>div{flex:1 1 auto;min-width:0;max-width:100%;overflow-x:auto}
.warning{background:#fff4d6;border:1px solid #d4a72c;border-left:6px solid #d4a72c;padding:.7em 1em;
margin:1em 0;font-weight:600}
nav ul{columns:2;font-size:.9em}
"""


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Text:
    markdown: str  # inline Markdown: **bold**, `code`


@dataclass
class Code:
    text: str


@dataclass
class Alert:
    markdown: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]  # cells are inline Markdown
    text_columns: set[str] = field(default_factory=set)  # left-aligned; the rest are numbers


@dataclass
class Figure:
    name: str  # file name beside report.md
    png: bytes
    caption: str


@dataclass
class SideBySide:
    columns: list[list[Any]]  # lists of blocks, shown next to each other in HTML


Block = Heading | Text | Code | Alert | Table | Figure | SideBySide


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def figures(blocks: Sequence[Block]) -> list[Figure]:
    found = []
    for block in blocks:
        if isinstance(block, Figure):
            found.append(block)
        elif isinstance(block, SideBySide):
            found += [f for column in block.columns for f in figures(column)]
    return found


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    return "\n\n".join([f"# {title}", *(_md_block(b) for b in blocks)]) + "\n"


def _md_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Text):
        return block.markdown
    if isinstance(block, Code):
        return f"```\n{block.text}\n```"
    if isinstance(block, Alert):
        return f"> **Warning: {block.markdown}**"
    if isinstance(block, Table):
        clean = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in block.rows]
        align = ["left" if name in block.text_columns else "right" for name in block.header]
        return tabulate(clean, headers=block.header, tablefmt="github", disable_numparse=True, colalign=align)
    if isinstance(block, Figure):
        return f"![{block.caption}]({block.name})"
    return "\n\n".join(_md_block(b) for column in block.columns for b in column)


_INLINE = MarkdownIt("commonmark", {"html": False})


def to_html(title: str, blocks: Sequence[Block]) -> str:
    """A self-contained page: inline CSS, figures as data URIs, nothing fetched."""
    toc = "".join(f'<li><a href="#{slug(b.text)}">{html.escape(b.text)}</a></li>'
                  for b in blocks if isinstance(b, Heading) and b.level == 2)
    ids: dict[str, int] = {}  # heading anchors, made unique ("query-aware" recurs under every section)
    body = "\n".join(_html_block(b, ids) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<nav><ul>{toc}</ul></nav>\n{body}\n</body>\n</html>\n")


def _html_block(block: Block, ids: dict[str, int]) -> str:
    if isinstance(block, Heading):
        anchor = slug(block.text)
        ids[anchor] = ids.get(anchor, 0) + 1
        anchor += f"-{ids[anchor]}" if ids[anchor] > 1 else ""
        return f'<h{block.level} id="{anchor}">{_inline(block.text)}</h{block.level}>'
    if isinstance(block, Text):
        return f"<p>{_inline(block.markdown)}</p>"
    if isinstance(block, Code):
        return f"<pre><code>{html.escape(block.text)}</code></pre>"
    if isinstance(block, Alert):
        return f'<div class="warning" role="alert">Warning: {_inline(block.markdown)}</div>'
    if isinstance(block, Table):
        classes = ["" if name in block.text_columns else ' class="num"' for name in block.header]
        head = "".join(f"<th{c}>{_inline(h)}</th>" for c, h in zip(classes, block.header, strict=True))
        body = "".join("<tr>" + "".join(f"<td{c}>{_inline(str(v))}</td>" for c, v in zip(classes, row, strict=True))
                       + "</tr>" for row in block.rows)
        return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if isinstance(block, Figure):
        data = base64.b64encode(block.png).decode("ascii")
        caption = html.escape(block.caption)
        return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
                f"<figcaption>{caption}</figcaption></figure>")
    columns = "".join("<div>" + "\n".join(_html_block(b, ids) for b in column) + "</div>" for column in block.columns)
    return f'<div class="side">{columns}</div>'


def _inline(text: str) -> str:
    return _INLINE.renderInline(text)

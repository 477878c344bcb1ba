"""Small helpers for self-contained HTML pages: escaping, number formatting, tables, the page shell.

Pages carry their CSS inline and their images as data: URIs, and link nothing outside
themselves, so they open the same from an e-mail attachment or an air-gapped share.
"""
from __future__ import annotations

import html
import math
from typing import Any, Iterable


class Raw(str):
    """HTML that is already safe (built by these helpers); everything else gets escaped."""


def esc(value: Any) -> str:
    return value if isinstance(value, Raw) else html.escape(str(value))


def markup(template: str, *args: Any, **kwargs: Any) -> Raw:
    """``template`` (our HTML, with ``{}`` fields) filled with escaped values: the one way data
    enters a tag, so an image id or a reason can never become markup."""
    return Raw(template.format(*map(esc, args), **{k: esc(v) for k, v in kwargs.items()}))


def number(value: Any, digits: int = 3) -> str:
    """A value for a table cell: None -> an en dash, floats to ``digits`` significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def cell(value: Any) -> str:
    return esc(value) if isinstance(value, (str, Raw)) else esc(number(value))


def table(headers: Iterable[Any], rows: Iterable[Iterable[Any]], css: str = "") -> Raw:
    headers = list(headers)
    head = f'<thead><tr>{"".join(f"<th>{esc(h)}</th>" for h in headers)}</tr></thead>' if any(headers) else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return Raw(f'<table class="{esc(css)}">{head}<tbody>{body}</tbody></table>')


def img(uri: str, alt: str, width: int, title: str = "") -> Raw:
    return markup('<img src="{}" alt="{}" title="{}" width="{}">', uri, alt, title or alt, int(width))


def section(anchor: str, title: str, *parts: str) -> Raw:
    return markup('<section id="{}"><h2>{}</h2>{}</section>', anchor, title, Raw("".join(parts)))


def paragraph(text: str) -> Raw:
    return Raw(f"<p>{esc(text)}</p>")


def details(summary: str, content: str) -> Raw:
    return markup("<details><summary>{}</summary>{}</details>", summary, Raw(content))


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
  padding:0 24px 48px;color:#1d1d1f}
h1{margin:24px 0 4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{margin:20px 0 8px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #ddd;padding:3px 8px;
  text-align:left;vertical-align:top}th{background:#f5f5f7}td{font-variant-numeric:tabular-nums}
img{image-rendering:pixelated;image-rendering:crisp-edges;border:1px solid #ccc;margin:1px;vertical-align:top}
.note{color:#555;font-size:13px}.flag{color:#b00020;font-weight:600}.warnings{border-left:4px solid #b00020;background:#fdecee;padding:4px 12px;margin:8px 0}.ok{color:#1b7f3b}
.gallery td{text-align:center;font-size:12px}.pair{white-space:nowrap}
nav a{margin-right:12px}pre{background:#f5f5f7;padding:8px;overflow:auto;font-size:12px;max-height:420px}
details{margin:8px 0}.plots svg{margin:0 12px 12px 0}.kv th{width:180px}
"""


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """sections: (anchor, title, html). Returns the whole document."""
    nav = " ".join(markup('<a href="#{}">{}</a>', a, t) for a, t, _ in sections)
    body = "".join(section(a, t, content) for a, t, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=\"note\">{esc(subtitle)}</p><nav>{nav}</nav>{body}</body></html>")

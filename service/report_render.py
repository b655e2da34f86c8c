"""Markdown and self-contained HTML from the report's sections (``service/report.py``).

A section is ``(title, blocks)``; a block is ``("p", text)``, ``("na", text)`` (a part
not available), ``("list", [text])``, ``("table", head, rows)``, ``("img", file, alt)``
or ``("code", text)``. Text may hold ``**bold**`` and ``code`` spans. In the HTML every
image is a base64 data URI, so the page needs nothing beside it.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

Block = tuple


def to_markdown(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    out = [f"# {title}", ""]
    for name, blocks in sections:
        out += [f"## {name}", ""]
        for b in blocks:
            if b[0] in ("p", "na"):
                out += [b[1], ""]
            elif b[0] == "list":
                out += [f"- {x}" for x in b[1]] + [""]
            elif b[0] == "table":
                out.append("| " + " | ".join(b[1]) + " |")
                out.append("|" + "---|" * len(b[1]))
                out += ["| " + " | ".join(r) + " |" for r in b[2]] + [""]
            elif b[0] == "img":
                out += [f"![{b[2]}]({b[1]})", ""]
            elif b[0] == "code":
                out += ["```json", b[1], "```", ""]
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then the two bits of markdown the text uses: **bold** and `code`."""
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #ddd}h2{margin-top:1.6em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}img{max-width:100%}
p.na{color:#888;font-style:italic}pre{background:#f6f8fa;padding:.6em;overflow:auto;font-size:12px}code{background:#f6f8fa}"""


def to_html(title: str, sections: list[tuple[str, list[Block]]], run_dir: Path) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]  # fmt: skip
    for name, blocks in sections:
        out.append(f"<section><h2>{html.escape(name)}</h2>")
        for b in blocks:
            if b[0] == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "na":
                out.append(f"<p class='na'>{_inline(b[1])}</p>")
            elif b[0] == "list":
                out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
            elif b[0] == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
                body = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                    for r in b[2]
                )
                out.append(f"<table><tr>{head}</tr>{body}</table>")
            elif b[0] == "img":
                data = base64.b64encode((run_dir / b[1]).read_bytes()).decode()
                out.append(f"<img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>")
            elif b[0] == "code":
                out.append(f"<pre>{html.escape(b[1])}</pre>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


IMAGE_RE = re.compile(r"!\[([^\]]*)\]\(([\w.-]+\.png)\)")


def inline_images(markdown: str, run_dir: Path) -> str:
    """``markdown`` with each ``![alt](file.png)`` of ``run_dir`` as a base64 data URI:
    the markdown a client fetches over the API names no file it cannot fetch."""

    def embed(m: re.Match[str]) -> str:
        f = run_dir / m.group(2)
        if not f.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()})"

    return IMAGE_RE.sub(embed, markdown)

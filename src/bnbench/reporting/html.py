"""The report's pages: report.md and a self-contained report.html that reads at a glance at 1280 px.

A page is a title and sections; a section is a heading and parts, each ("text", sentence), ("list", items),
("table", DataFrame) or ("figures", [(png name, caption)]); empty parts and sections are left out.
tests/test_report.py opens the page in headless Chromium at 1280 px: every figure loads, nothing scrolls
sideways, no table or figure is wider than the page.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1.5em;color:#222;line-height:1.4}
h1{margin:.2em 0} h2{margin:1.4em 0 .4em;border-bottom:1px solid #ddd;padding-bottom:.15em}
table.t{border-collapse:collapse;margin:.5em 0;max-width:100%}
table.t td,table.t th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:right;overflow-wrap:anywhere}
table.t th{background:#f4f4f4}
figure{margin:1em 0} img{max-width:100%;height:auto} figcaption{color:#555;font-size:.9em}
.verdict li{font-size:1.1em;margin:.3em 0} p.note{color:#444;margin:.3em 0}
"""


def _fmt(v, floatfmt: str = "{:.4f}") -> str:
    if isinstance(v, (float, np.floating)):
        return "-" if not np.isfinite(v) else floatfmt.format(v)
    return str(v)


def md_table(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def html_table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-", border=0, classes="t")


def _present(kind: str, body) -> bool:
    return bool(len(body)) if kind == "table" else bool(body)


def write_md(rep: Path, title: str, sections) -> None:
    md = ["# bnbench report", "", title, ""]
    for name, parts in sections:
        parts = [(k, b) for k, b in parts if _present(k, b)]
        if not parts:
            continue
        md += [f"## {name}", ""]
        for kind, body in parts:
            if kind == "text":
                md += [body, ""]
            elif kind == "table":
                md += [md_table(body), ""]
            elif kind == "list":
                md += [*[f"- {x}" for x in body], ""]
            elif kind == "figures":
                md += [*[f"![{cap}]({n})" for n, cap in body], ""]
    (rep / "report.md").write_text("\n".join(md))


def write_html(rep: Path, title: str, sections) -> None:
    def img(name: str, cap: str) -> str:
        b64 = base64.b64encode((rep / name).read_bytes()).decode()
        return (f'<figure><img alt="{html.escape(cap)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{html.escape(cap)}</figcaption></figure>")

    out = []
    for name, parts in sections:
        parts = [(k, b) for k, b in parts if _present(k, b)]
        if not parts:
            continue
        out.append(f"<h2>{html.escape(name)}</h2>")
        for kind, body in parts:
            if kind == "text":
                out.append(f'<p class="note">{html.escape(body)}</p>')
            elif kind == "table":
                out.append(html_table(body))
            elif kind == "list":
                cls = ' class="verdict"' if name == "Verdict" else ""
                out.append(f"<ul{cls}>{''.join(f'<li>{html.escape(x)}</li>' for x in body)}</ul>")
            elif kind == "figures":
                out.append("".join(img(n, c) for n, c in body))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>bnbench report</title>
<style>{CSS}</style></head><body>
<h1>bnbench report</h1>
<p>{html.escape(title)}</p>
{''.join(out)}
</body></html>
"""
    (rep / "report.html").write_text(page)

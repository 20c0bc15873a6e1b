"""The HTML leaderboard: one self-contained file (inline CSS and JS, plots as base64 PNG), so it
opens with no network. Every table sorts on a header click (numerically on the exact value kept
in data-sort) and filters rows by the text typed in the box above it.
"""
from __future__ import annotations

import base64
import html as _html
import re

from lorabench.report import display as D
from lorabench.report.plots import Plot
from lorabench.report.tables import Report

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1500px;color:#222}
table{border-collapse:collapse;margin:.4em 0 1.4em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f0;cursor:pointer;user-select:none;white-space:nowrap}
th.asc::after{content:" \\25B2"} th.desc::after{content:" \\25BC"}
input.filter{margin:.2em 0;padding:3px;width:22em}
img{border:1px solid #ddd} div.plot{overflow-x:auto}
.verdict-holds{color:#060}.verdict-does{color:#a00}
"""

JS = """
function cellKey(td){var k=td.getAttribute('data-sort');var n=parseFloat(k);
  return (k!==null&&k!==''&&!isNaN(n)&&/^[-+0-9.eE]+$/.test(k))?{n:n}:{s:(k===null?td.textContent:k)};}
function cmp(a,b){if('n' in a&&'n' in b)return a.n-b.n;if('n' in a)return -1;if('n' in b)return 1;
  return a.s<b.s?-1:a.s>b.s?1:0;}
function sortTable(th){var table=th.closest('table');var idx=Array.prototype.indexOf.call(th.parentNode.children,th);
  var asc=!th.classList.contains('asc');table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
  th.classList.add(asc?'asc':'desc');var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
  rows.forEach(function(r,i){r._i=i;});
  rows.sort(function(r1,r2){var c=cmp(cellKey(r1.cells[idx]),cellKey(r2.cells[idx]));return (asc?c:-c)||r1._i-r2._i;});
  rows.forEach(function(r){body.appendChild(r);});}
function filterTable(input){var table=document.getElementById(input.getAttribute('data-table'));
  var q=input.value.toLowerCase();Array.prototype.forEach.call(table.tBodies[0].rows,function(r){
  r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});}
document.addEventListener('DOMContentLoaded',function(){
  document.querySelectorAll('table.sortable th').forEach(function(th){th.addEventListener('click',function(){sortTable(th);});});
  document.querySelectorAll('input.filter').forEach(function(i){i.addEventListener('input',function(){filterTable(i);});});});
"""


def esc(s) -> str:
    return _html.escape(str(s), quote=True)


def html_table(t: D.Table) -> str:
    tid = t.anchor or "t"
    head = "".join(f"<th>{esc(c)}</th>" for c in t.columns)
    body = []
    for row in t.rows:
        cells = []
        for txt, key in row:
            k = "" if isinstance(key, float) and key != key else (repr(key) if isinstance(key, float) else str(key))
            if k == "inf":
                k = "1e308"
            cls = ""
            if txt in ("holds", "does not hold") or txt.startswith("inconclusive"):
                cls = ' class="verdict-holds"' if txt == "holds" else (' class="verdict-does"' if txt == "does not hold" else "")
            cells.append(f'<td data-sort="{esc(k)}"{cls}>{esc(txt)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<input class="filter" type="search" placeholder="filter rows…" data-table="{esc(tid)}" '
            f'aria-label="filter {esc(t.title)}">\n'
            f'<table class="sortable" id="{esc(tid)}"><thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + "\n</tbody></table>")


def plot_html(name: str, plot: Plot, table_anchor: str | None) -> str:
    """The PNG with an image map: hovering over any point shows its method, family and values
    (only the Pareto front and the reference methods carry labels in the image itself); a click
    goes to the table beside it. The image keeps its own size (scrolling if the page is narrower),
    since an image map's coordinates are the image's pixels."""
    areas = "".join(f'<area shape="circle" coords="{h.x_px:g},{h.y_px:g},6" title="{esc(h.text)}" alt="{esc(h.label)}"'
                    + (f' href="#{esc(table_anchor)}"' if table_anchor else "") + ">" for h in plot.hotspots)
    src = base64.b64encode(plot.png).decode()
    return (f'<div class="plot"><img alt="{esc(name)} plots (hover over a point for its method)" usemap="#map-{esc(name)}" '
            f'src="data:image/png;base64,{src}"><map name="map-{esc(name)}">{areas}</map></div>')


_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\(plots/(?P<name>[^)]+)\)$")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def scenario_line(n: int, single: bool) -> str:
    """The "What was run" line for the records reported only in their scenario's section."""
    return (f"{n} scenario record(s) (the sequence scenario, mixtures, reuse, forgetting): reported in their "
            f"sections below" + ("" if single else "; no single-task trials, so the single-task sections are left out"))


def _inline(text: str) -> str:
    """A Markdown line's inline marks as the scenario sections write them: **bold**, *emphasis*, `code`."""
    out = esc(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _cells(line: str) -> list[str]:
    """A Markdown table row's cells (an escaped pipe, \\|, stays in its cell)."""
    cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
    return [c.strip().replace("\\|", "|") for c in cells]


def _sort_key(text: str):
    """A cell's sort key: its leading number ("0.742 ± 0.040" sorts as 0.742, "1,234" as 1234), else its text."""
    m = _NUMBER.match(text.replace(",", ""))
    return float(m.group(0)) if m else text


def markdown_section(lines: list[str], plots: dict) -> list[str]:
    """A scenario's Markdown section (federated, cross-task, mixture, reuse, continual, forgetting: lorabench/report/
    *.py, `markdown`) as HTML, so the page and LEADERBOARD.md say the same: headings, paragraphs, lists, tables
    (sortable and filterable as every table here) and the plots (embedded, from `plots`; a plot not there is named)."""
    out: list[str] = []
    items: list[str] = []
    table: list[str] = []
    heading = ""

    def flush() -> None:
        nonlocal items, table
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items = []
        if table:
            head = _cells(table[0])
            body = [r for r in table[1:] if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", r.strip())]
            anchor = re.sub(r"[^a-z0-9]+", "-", f"{heading} {len(out)}".lower()).strip("-")
            rows = [[(c, _sort_key(c)) for c in _cells(r)] for r in body]
            out.append(html_table(D.Table(heading, head, rows, anchor=anchor)))
            table = []

    for line in lines:
        if line.startswith("|"):
            if items:
                flush()
            table.append(line)
            continue
        if table or (items and not line.startswith("- ")):
            flush()
        if not line.strip():
            continue
        if line.startswith("- "):
            items.append(line[2:])
        elif line.startswith("### "):
            heading = line[4:]
            out.append(f"<h3>{_inline(heading)}</h3>")
        elif line.startswith("## "):
            heading = line[3:]
            out.append(f"<h2>{_inline(heading)}</h2>")
        elif m := _IMAGE.match(line.strip()):
            plot = plots.get(m["name"])
            out.append(plot_html(m["name"][:-4], plot, None) if plot is not None
                       else f"<p>(plot {esc(m['name'])} not drawn)</p>")
        else:
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return out


def render_html(rep: Report, coverage: list[str], claims, plots: dict[str, bytes], footer: str,
                scenarios: list[str] | None = None, n_scenario: int = 0) -> str:
    """`scenarios`: the scenario sections as HTML (markdown_section); `n_scenario`: how many of the records are
    scenario records (reported only there). With no single-task record the single-task sections are left out."""
    single = len(rep.records) > 0 or not n_scenario
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>lorabench leaderboard</title>", f"<style>{CSS}</style>", f"<script>{JS}</script>",
             "</head><body>", "<h1>lorabench leaderboard</h1>",
             f"<p>Generated by <code>python -m lorabench report</code> from {len(rep.records) + n_scenario} record(s); never edited "
             "by hand. Cells: mean over seeds ± 95% interval (seed and evaluation-sample variance where per-example "
             "outcomes were recorded; the column \"interval over\" says which). Click a column header to sort, "
             "type in a box to filter.</p>", "<h2>What was run</h2><ul>"]
    parts += [f"<li>{esc(c)}</li>" for c in coverage]
    if n_scenario:
        parts.append(f"<li>{esc(scenario_line(n_scenario, single))}</li>")
    parts += ["</ul>", "<h2>Notes</h2><ul>"]
    parts += [f"<li>{esc(n)}</li>" for n in rep.notes] or ["<li>none</li>"]
    parts.append("</ul>")
    if not single:  # scenario records only: their sections, then the failures
        parts += scenarios or []
        parts += ["<h2>Failed trials</h2>", html_table(D.failures_table(rep)), f"<hr><p>{esc(footer)}</p>",
                  "</body></html>", ""]
        return "\n".join(parts)
    parts += ["<h2>Findings: the survey's headline claims</h2><ul>"]
    parts += [f"<li>{esc(x.replace('**', ''))}</li>" for x in D.findings_summary(claims)]
    parts += ["</ul>", html_table(D.findings_table(claims)), "<h2>Trivial baselines and power</h2>",
              html_table(D.baselines_table(rep))]
    if len(rep.lr_selection):
        parts += ["<h2>Learning rates</h2>", html_table(D.lr_selection_table(rep))]
    if len(rep.aggregate):
        parts += ["<h2>Across tasks</h2>", html_table(D.aggregate_table(rep))]
    if len(rep.curves):
        parts += ["<h2>Validation curves</h2>", html_table(D.curves_table(rep))]
        parts += [plot_html(n[:-4], plot, "curves") for n, plot in sorted(plots.items()) if n.startswith("curves-")]
    parts += ["<h2>Leaderboard per task</h2>"]
    for t in D.leaderboard_tables(rep):
        parts += [f"<h3>{esc(t.title)}</h3>", html_table(t)]
        plot = plots.get(f"{t.title}.png")
        if plot:
            parts.append(plot_html(t.title, plot, t.anchor))
    parts += scenarios or []  # the scenario sections, as in LEADERBOARD.md
    parts += ["<h2>Average rank</h2>", html_table(D.average_rank_table(rep))]
    s, d = D.paired_tables(rep)
    parts += ["<h2>Paired comparison against LoRA</h2>",
              "<p>Mean paired difference (same seed and example) against zero, two-sided, Holm-corrected over the "
              "comparisons: win/loss when the corrected p is below 0.05, tie otherwise; identical for the same "
              "predictions everywhere; untested when nothing varies or too few pairs.</p>",
              html_table(s), html_table(d), "<h2>Failed trials</h2>", html_table(D.failures_table(rep))]
    if "average.png" in plots:
        parts += ["<h2>Averaged over tasks</h2>", plot_html("average", plots["average.png"], "average-rank")]
    parts += [f"<hr><p>{esc(footer)}</p>", "</body></html>", ""]
    return "\n".join(parts)

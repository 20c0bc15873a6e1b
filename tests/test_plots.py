"""The report's plots are readable (issue 22): only the Pareto front and the reference methods carry
labels, no two labels overlap, families have a legend, every point keeps its name in the HTML
page, and a plot promises error bars only when it has them."""
import html
import re

from lorabench.report import plots, tables
from lorabench.report.build import write_report
from lorabench.runner.records import read_records
from tests.test_report import RESULTS, record, standard_like


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_published_plots_label_the_front_and_references_without_overlap():
    # about 30 methods sit near 1.2M trainable parameters: their labels used to merge into a block
    summary = tables.build(read_records(RESULTS / "standard" / "records.jsonl", warn=False)).summary
    out = plots.task_plots(summary)
    assert set(out) == {"rt-sentiment.png", "sarcasm.png", "quartz.png", "average.png"}
    for name, plot in out.items():
        assert plot.labels, name
        assert all(lab.free for lab in plot.labels), [lab.text for lab in plot.labels if not lab.free]
        for k in range(len(plots.AXES)):
            boxes = [lab for lab in plot.labels if lab.panel == k]
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    assert not _overlap(a.box, b.box), (name, k, a.text, b.text)
            named = {lab.text for lab in boxes}
            assert len(named) < 20, (name, k, sorted(named))  # the front and the references, not every method
    task = summary[summary["task"] == "rt-sentiment"]
    named = {lab.text for lab in out["rt-sentiment.png"].labels}
    assert set(plots.REFERENCE_LABELS) <= named
    assert {h.label for h in out["rt-sentiment.png"].hotspots} == set(task["label"])


def test_every_point_is_named_on_hover_in_the_html(tmp_path):
    recs = standard_like(missing_seed=False, failed=False, unknown=False)
    (page,) = write_report(recs, tmp_path, ["html"])
    text = page.read_text()
    maps = dict(re.findall(r'<map name="map-([^"]+)">(.*?)</map>', text))
    assert set(maps) == {"rt-sentiment", "sarcasm", "average"}
    for task in ("rt-sentiment", "sarcasm"):
        titles = [html.unescape(t) for t in re.findall(r'title="([^"]*)"', maps[task])]
        assert len(titles) == 5 * len(plots.AXES)  # every method on every panel
        assert {t.split(" (")[0] for t in titles} == {"full", "head", "lora", "dora", "vera"}
        assert f'href="#task-{task}"' in maps[task]
    assert f'usemap="#map-rt-sentiment"' in text


def test_error_bars_are_promised_only_when_there_are_some():
    one_seed = tables.build([record("t", m, 0, s) for m, s in (("lora", 0.8), ("head", 0.7), ("dora", 0.81))]).summary
    title = plots.task_plots(one_seed)["t.png"].title
    assert "95% CI" not in title and "no error bars (one seed per method)" in title
    three = tables.build(standard_like(missing_seed=False, failed=False, unknown=False)).summary
    out = plots.task_plots(three)
    assert "error bars: 95% CI over seeds" in out["sarcasm.png"].title
    assert "95% CI" not in out["average.png"].title and "a mean over tasks" in out["average.png"].title

"""The HTML leaderboard in a real headless browser: Debian's chromium driven by selenium.

Opens the generated page (a local file, no network), clicks a column header and checks that the
row order changed, filters rows, and checks that every method of the records appears. Skips only
when chromium or its driver is not installed (CI installs `chromium chromium-driver`).
"""
from __future__ import annotations

import shutil
import tempfile

import pytest

from lorabench.report.build import write_report
from tests.test_report import standard_like

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="lorabench-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def column(driver, table_id: str, idx: int) -> list[str]:
    rows = driver.find_elements("css selector", f"#{table_id} tbody tr")
    return [r.find_elements("css selector", "td")[idx].text for r in rows if r.is_displayed()]


def test_html_leaderboard_sorts_filters_and_lists_every_method(browser, tmp_path):
    recs = standard_like()
    write_report(recs, tmp_path, ["html"])
    browser.get((tmp_path / "leaderboard.html").as_uri())
    assert browser.title == "lorabench leaderboard"

    # every method in the records appears on the page
    page = browser.find_element("tag name", "body").text
    for label in sorted({r["label"] for r in recs}):
        assert label in page, f"method {label} missing from the HTML page"
    assert browser.execute_script("return document.images.length") >= 1
    assert browser.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")

    # the per-task table is shown best first; clicking the "method" header sorts it by name
    table = "task-rt-sentiment"
    before = column(browser, table, 1)
    assert before[0] == "full" and before[-1] == "head"
    header = browser.find_elements("css selector", f"#{table} thead th")[1]
    assert header.text == "method"
    header.click()
    after = column(browser, table, 1)
    assert after != before and after == sorted(before)
    header.click()  # again: descending
    assert column(browser, table, 1) == sorted(before, reverse=True)

    # numeric sort on the metric column uses the exact value, not the text
    metric_header = browser.find_elements("css selector", f"#{table} thead th")[3]
    metric_header.click()
    scores = [float(x.split(" ")[0]) for x in column(browser, table, 3)]
    assert scores == sorted(scores)

    # the filter box hides rows that do not match
    box = browser.find_element("css selector", f'input.filter[data-table="{table}"]')
    box.send_keys("lora")
    assert column(browser, table, 1) == ["lora"]

"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver).

Skipped, saying why, where the browser, its driver or selenium is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from finetune.schedule.store import StateStore
from tests.test_dashboard import experiment, requests_in, set_state
from tests.test_dashboard_runs import TRACEBACK, rich_experiment, run_ids
from tests.test_training import _wait_for_chunks, demo_config, finetune, small, start_experiment, states

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium/chromedriver (apt-get install chromium chromium-driver)"),
    pytest.mark.skipif(not HAVE_SELENIUM, reason="selenium is not installed (pip install selenium)"),
]


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def dashboard(root: Path, cwd: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "finetune.cli", "dashboard", str(root), "--port", "0"], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()
    assert "http://" in line, line
    return process, line.split(": ", 1)[1].strip()


def wait_until(condition, timeout: float = 60.0):
    """Poll `condition` until it is true. The page redraws its tables as it polls the experiment, so an element
    found a moment ago may be replaced before it is read: that is asked again, not a failure."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = condition()
        except (StaleElementReferenceException, NoSuchElementException):
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("timed out")


def rows(driver) -> list:
    return driver.find_elements("css selector", "#runs tbody tr")


def button(driver, run_id: str, action: str) -> list:
    return driver.find_elements("css selector", f"button[data-action={action}][data-run='{run_id}']")


def click(driver, run_id: str, action: str) -> None:
    """Click a run's button; the table is redrawn as the page polls, so a button found just before a
    redraw may be gone by the click: find it again until the click lands."""
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt() -> bool:
        try:
            button(driver, run_id, action)[0].click()
        except (StaleElementReferenceException, IndexError):
            return False
        return True

    wait_until(attempt)


def status_text(driver) -> str:
    return driver.find_element("id", "status").text


def test_a_failed_run_offers_retry_and_the_page_says_who_applies_it(tmp_path, browser) -> None:
    root = experiment(tmp_path)  # no training: runs written straight into the state store
    store = StateStore(root / "state.db")
    failed, stopped, pending = [run.run_id for run in store.runs()]
    store.close()
    set_state(root, failed, "failed")
    set_state(root, stopped, "stopped")
    server, url = dashboard(root, tmp_path)
    try:
        browser.get(url)
        wait_until(lambda: button(browser, failed, "retry"))
        assert not button(browser, failed, "resume") and button(browser, stopped, "resume") and not button(browser, stopped, "retry")
        assert button(browser, pending, "stop") and not button(browser, pending, "resume")
        click(browser, failed, "retry")
        wait_until(lambda: "accepted" in status_text(browser))
        assert "the next `finetune run --resume` applies it" in status_text(browser)
        browser.execute_script("for (let id = 0; id < 10000; id++) clearInterval(id);")  # no re-render under the click
        set_state(root, stopped, "completed")
        click(browser, stopped, "resume")
        wait_until(lambda: "refused" in status_text(browser))
        assert f"run {stopped} is completed; resume acts on a stopped run" in status_text(browser)
        assert [kind for _, kind, _, _ in requests_in(root)] == ["retry"]
    finally:
        server.terminate()


def api_runs(driver) -> list[dict]:
    return driver.execute_async_script(
        "const done = arguments[0]; fetch('/api/runs').then((r) => r.json()).then((body) => done(body.runs));")


def layout(driver) -> dict:
    """Where the table and the charts lie, in pixels of the window."""
    return driver.execute_script("""
        const wrap = document.querySelector('.table-wrap'), page = document.documentElement.clientWidth;
        const right = (nodes) => Math.max(...[...nodes].map((n) => n.getBoundingClientRect().right));
        return {table: wrap.scrollWidth, wrap: wrap.clientWidth, page: page,
                actions: right(document.querySelectorAll('#runs td.actions button')),
                charts: right(document.querySelectorAll('.chart')),
                chart_widths: [...document.querySelectorAll('.chart svg')].map((svg) => svg.getBoundingClientRect().width),
                ticks: [...document.querySelectorAll('.chart')].map((chart) => {
                    const svg = chart.querySelector('svg').getBoundingClientRect();
                    const ys = [...chart.querySelectorAll('.y-tick')], xs = [...chart.querySelectorAll('.x-tick')];
                    return {metric: chart.dataset.metric, y: ys.length, x: xs.length,
                            left: Math.min(...ys.map((t) => t.getBoundingClientRect().left - svg.left))};
                })};""")


def test_at_1400_px_the_table_fits_and_the_charts_draw_every_run_in_its_colour(tmp_path, browser) -> None:
    root = rich_experiment(tmp_path)  # six runs, five generation metric columns
    once = run_ids(root)[1]  # evaluated once, then stopped at rung 1
    server, url = dashboard(root, tmp_path)
    try:
        browser.get(url)
        wait_until(lambda: len(rows(browser)) == 6 and browser.find_elements("css selector", ".chart[data-metric=rouge_l]"))
        seen = layout(browser)
        assert seen["table"] <= seen["wrap"] and seen["actions"] <= seen["page"], seen  # no scrolling to reach the buttons
        assert len(seen["chart_widths"]) >= 4 and min(seen["chart_widths"]) >= 560 and seen["charts"] <= seen["page"]
        for chart in seen["ticks"]:  # labels inside the chart (not `).2009`), and more than the two ends
            steps = 2 if chart["metric"] in ("loss", "reward") else 3  # logged at steps 1 and 2 only
            assert chart["left"] >= 0 and chart["y"] >= 3 and chart["x"] >= steps, chart
        assert len(browser.find_elements("css selector", f".chart[data-metric=eval_loss] circle.point[data-run='{once}']")) == 1
        for run in api_runs(browser):
            marks = browser.find_elements("css selector", f".chart[data-metric=eval_loss] svg [data-run='{run['run_id']}']")
            assert marks and {mark.get_attribute("stroke") or mark.get_attribute("fill") for mark in marks} == {run["color"]}
        events = browser.find_element("id", "events").text
        assert "rung=1, metric=\"eval_loss\", value=0.2009, cutoff=0.25, seen=1" in events and "1.000" not in events
    finally:
        server.terminate()


def test_at_a_narrow_width_the_actions_and_charts_stay_in_the_window(tmp_path, browser) -> None:
    root = rich_experiment(tmp_path)
    server, url = dashboard(root, tmp_path)
    try:
        browser.set_window_size(700, 900)
        browser.get(url)
        wait_until(lambda: len(rows(browser)) == 6 and browser.find_elements("css selector", ".chart[data-metric=rouge_l]"))
        seen = layout(browser)
        assert seen["actions"] <= seen["page"] and seen["charts"] <= seen["page"], seen  # the table scrolls under a fixed actions column
        assert browser.execute_script("return document.documentElement.scrollWidth") <= seen["page"]
    finally:
        server.terminate()


def test_hovering_a_chart_shows_each_runs_value_at_that_step(tmp_path, browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    root = rich_experiment(tmp_path)
    first, once = run_ids(root)[:2]
    server, url = dashboard(root, tmp_path)
    try:
        browser.get(url)
        area = wait_until(lambda: browser.find_elements("css selector", ".chart[data-metric=eval_loss] .hover-area"))[0]
        browser.execute_script("for (let id = 0; id < 10000; id++) clearInterval(id);")  # no redraw under the pointer
        ActionChains(browser).move_to_element_with_offset(area, area.size["width"] // 2 - 2, 0).perform()  # the last step
        tooltip = wait_until(lambda: [t for t in browser.find_elements("css selector", ".chart[data-metric=eval_loss] .tooltip") if t.is_displayed()])[0]
        lines = tooltip.text.splitlines()
        assert lines[0] == "step 6" and len(lines) == 7, lines
        entry = {row.get_attribute("data-run"): row.text for row in tooltip.find_elements("css selector", "[data-run]")}
        assert entry[first].endswith(": 0.1809") and entry[once].endswith(": 0.214 (step 2)"), entry
    finally:
        server.terminate()


def test_each_run_has_a_page_with_its_knobs_curves_failure_and_config(tmp_path, browser) -> None:
    root = rich_experiment(tmp_path)
    failed = run_ids(root)[2]
    server, url = dashboard(root, tmp_path)
    try:
        browser.get(url)
        wait_until(lambda: browser.find_elements("css selector", f"tr[data-run='{failed}'] a.run-link"))[0].click()
        traceback = wait_until(lambda: browser.find_elements("css selector", "#events pre.traceback"))[0]
        assert traceback.text == TRACEBACK and 'run_failed error="RuntimeError: CUDA out of memory"' in browser.find_element("id", "events").text
        assert browser.find_element("css selector", "[data-fact=state]").text == "failed: boom"  # the run's error
        knobs = browser.find_element("id", "knobs").text
        assert "training_args.learning_rate" in knobs and "peft_conf.peft_kwargs.r" in knobs
        assert {c.get_attribute("data-metric") for c in browser.find_elements("css selector", ".chart")} >= {"loss", "eval_loss", "rouge_l"}
        assert "no samples for this run yet" in browser.find_element("id", "samples").text
        assert '"learning_rate"' in browser.find_element("id", "config").text
        browser.find_element("id", "back").click()  # back to the experiment, the token kept
        wait_until(lambda: len(rows(browser)) == 6)
    finally:
        server.terminate()


@pytest.fixture
def finished(tmp_path, demo_dir) -> Path:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "page")
    finetune(tmp_path, "run", str(config), *small("page", steps=4, chunks=2))
    return tmp_path / "runs" / "page"


def test_the_page_shows_the_runs_curves_and_decisions_of_a_finished_experiment(tmp_path, finished, browser) -> None:
    server, url = dashboard(finished, tmp_path)
    try:
        browser.get(url)
        wait_until(lambda: len(rows(browser)) == 4)
        text = browser.find_element("id", "runs").text
        assert text.count("completed") == 4 and "2/2" in text and "learning_rate=" in text
        charts = {chart.get_attribute("data-metric") for chart in browser.find_elements("css selector", ".chart")}
        assert {"loss", "eval_loss"} <= charts
        assert len(browser.find_elements("css selector", ".chart[data-metric=eval_loss] path")) == 4
        assert "run_completed" in browser.find_element("id", "events").text
        browser.find_elements("css selector", "#runs tbody input[type=checkbox]")[0].click()  # leave one run out of the charts
        wait_until(lambda: len(browser.find_elements("css selector", ".chart[data-metric=eval_loss] path")) == 3)
    finally:
        server.terminate()


def test_a_clone_submitted_through_the_form_appears_as_a_new_run(tmp_path, finished, browser) -> None:
    server, url = dashboard(finished, tmp_path)
    try:
        browser.get(url)
        wait_until(lambda: len(rows(browser)) == 4)
        browser.find_elements("css selector", "button[data-action=clone]")[0].click()
        field = wait_until(lambda: [f for f in browser.find_elements("css selector", "#clone-fields .field")
                                    if f.get_attribute("data-key") == "training_args.learning_rate"])[0]
        value = field.find_element("css selector", "[name=value]")
        value.clear()
        value.send_keys("-1")
        browser.find_element("id", "clone-submit").click()
        error = wait_until(lambda: field.find_element("css selector", ".error").text)
        assert "greater than 0" in error  # shown next to the field; nothing was queued
        value.clear()
        value.send_keys("0.002")
        browser.find_element("id", "clone-submit").click()
        wait_until(lambda: "clone requested" in browser.find_element("id", "status").text)
        finetune(tmp_path, "run", "--resume", str(finished))  # the controller applies the request and trains the clone
        wait_until(lambda: len(rows(browser)) == 5, timeout=30)
        assert "learning_rate=\"0.002\"" in browser.find_element("id", "runs").text or "0.002" in browser.find_element("id", "runs").text
    finally:
        server.terminate()


def test_the_stop_button_stops_a_run_of_a_live_experiment(tmp_path, demo_dir, browser) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "live")
    process = start_experiment(tmp_path, ["run", str(config), *small("live", steps=80, chunks=8), "--set", "peft_conf.peft_kwargs.r=!list [4]"])
    root = tmp_path / "runs" / "live"
    try:
        _wait_for_chunks(root, 1, process)
        server, url = dashboard(root, tmp_path)
        try:
            browser.get(url)
            wait_until(lambda: len(rows(browser)) == 2)
            target = wait_until(lambda: rows(browser)[0].get_attribute("data-run"))
            wait_until(lambda: browser.find_element("css selector", f"button[data-action=stop][data-run='{target}']").click() or True)
            wait_until(lambda: "stopped" in browser.find_element("css selector", f"tr[data-run='{target}']").text, timeout=180)
            assert states(root)[target] == "stopped"
            with sqlite3.connect(root / "state.db") as db:
                assert db.execute("SELECT status FROM requests WHERE kind = 'stop'").fetchone()[0] == "applied"
        finally:
            server.terminate()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_a_run_page_shows_the_answers_its_evaluations_kept(tmp_path, browser) -> None:
    root = rich_experiment(tmp_path)
    first = run_ids(root)[0]
    with sqlite3.connect(root / "state.db") as db:
        db.execute("INSERT INTO samples VALUES (?, 4, 0, ?, '5', '4')", (first, '[{"role": "user", "content": "2 plus 2?"}]'))
    server, url = dashboard(root, tmp_path)
    try:
        base, query = url.split("/?")
        browser.get(f"{base}/run/{first}?{query}")
        sample = wait_until(lambda: browser.find_elements("css selector", "#samples .sample"))[0]
        fields = {field.get_attribute("data-field"): field.text for field in sample.find_elements("css selector", "[data-field]")}
        assert fields == {"step": "step 4", "position": "position 0", "prompt": "prompt user: 2 plus 2?", "completion": "completion 5",
                          "reference": "reference 4"}
    finally:
        server.terminate()

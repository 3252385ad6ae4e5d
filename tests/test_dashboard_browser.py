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
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
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
            target = rows(browser)[0].get_attribute("data-run")
            browser.find_element("css selector", f"button[data-action=stop][data-run='{target}']").click()
            wait_until(lambda: "stopped" in browser.find_element("css selector", f"tr[data-run='{target}']").text, timeout=180)
            assert states(root)[target] == "stopped"
            with sqlite3.connect(root / "state.db") as db:
                assert db.execute("SELECT status FROM requests WHERE kind = 'stop'").fetchone()[0] == "applied"
        finally:
            server.terminate()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

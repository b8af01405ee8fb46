"""What a user sees in MLflow's UI after a sweep: the link the sweep prints, opened in headless
Chromium against `mlflow ui` on the sweep's store (127.0.0.1 only)."""

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from harness.runs.tracking import LOCAL_UI
from tests.helpers.browser import chromium, mlflow_ui, page_text, wait_for, why_no_browser
from tests.helpers.cli import QUICK, cli_command
from tests.helpers.store import new_store

SHOTS = os.environ.get("REDUCE_LOSS_SHOTS")  # a folder: save screenshots of the pages there


def _images(driver, part: str) -> list[dict]:
    """The page's <img> elements whose src contains `part`: their src and decoded size."""
    return driver.execute_script(
        "return [...document.images].filter(i => i.src.includes(arguments[0]))"
        ".map(i => ({src: i.src, width: i.naturalWidth, complete: i.complete}))", part)


def _tables_text(driver) -> list[str]:
    # textContent: the description shows its top and hides the rest behind "Show more"
    return driver.execute_script("return [...document.querySelectorAll('table')].map(t => t.textContent)")


def _close_assistant(driver) -> None:
    """Close the UI's assistant panel, where it is open: it covers part of the page."""
    driver.execute_script("const b = [...document.querySelectorAll('button')]"
                          ".find(b => b.getAttribute('aria-label') === 'Close'); if (b) b.click();")


def _shot(driver, name: str, scroll_to: str | None = None) -> None:
    if not SHOTS:
        return
    _close_assistant(driver)
    if scroll_to:
        driver.execute_script("const e = [...document.querySelectorAll('h1,h2,h3,h4,span,div')]"
                              ".find(e => e.textContent.trim() === arguments[0]); if (e) e.scrollIntoView();", scroll_to)
        time.sleep(1)
    Path(SHOTS).mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(Path(SHOTS) / f"{name}.png"))


def _pick_metrics(driver, names: list[str]) -> None:
    """In the compare view's parallel-coordinates plot: drop the default metric, pick `names`."""
    from selenium.webdriver.common.keys import Keys
    box = driver.find_elements("css selector", "input[role=combobox]")[1]  # Parameters, then Metrics
    box.click()
    box.send_keys(Keys.BACKSPACE)
    for name in names:
        box.click()
        box.send_keys(name)
        wait_for(driver, f"{name} offered", lambda d: any(name in o.text for o in d.find_elements(
            "css selector", ".du-bois-light-select-item-option")))
        box.send_keys(Keys.ENTER)
    box.send_keys(Keys.ESCAPE)
    driver.execute_script("document.activeElement.blur()")


@pytest.mark.slow
def test_the_printed_link_opens_the_sweeps_runs_and_its_answer(tmp_path):
    why = why_no_browser()
    if why:
        pytest.skip(f"no headless browser: {why}")
    store = new_store(tmp_path / "mlflow.db")
    # the UI starts (20-40 s here) while the sweep trains
    with mlflow_ui(store, tmp_path / "ui.log") as base:
        sweep = subprocess.run(cli_command(["-m", "reduce_loss=mean,sum", *QUICK, "trainer.threads=1"]), cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        summary = sweep.stdout[sweep.stdout.index("== sweep finished =="):].splitlines()
        assert summary[-2] == f"open the runs: mlflow ui --backend-store-uri {store}"
        link = summary[-1].removeprefix("then browse:").strip()
        assert link.startswith(f"{LOCAL_UI}/#/experiments/") and "workflowType=machine_learning" in link

        client = MlflowClient(store)
        sweep_dir = next(tmp_path.glob("multirun/*/*"))
        parent = client.get_run((sweep_dir / "mlflow_parent_run_id").read_text())
        experiment = parent.info.experiment_id
        children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        names = [parent.info.run_name] + sorted(r.info.run_name for r in children)
        assert names[1:] == ["mean-seed0", "sum-seed0"]
        labels = pd.read_csv(sweep_dir / "analysis" / "paired_difference.csv").bucket_range.unique()

        with chromium() as driver:
            # 1. the link: the model-training view's runs table, the sweep's three runs flat, parent first
            driver.get(link.replace(LOCAL_UI, base))
            text = wait_for(driver, "the runs table with the sweep's runs",
                            lambda d: next((t for t in [page_text(d)] if all(n in t for n in names)), None))
            assert text.index(names[0]) < text.index("sum-seed0") < text.index("mean-seed0")
            assert "3 matching runs" in text and "diff_vs_mean/sum/b1_" in text  # the view's columns
            assert "Traces 0" not in text and "Detect Issues" not in text  # not the GenAI overview
            _shot(driver, "runs_page")

            # 2. the parent's overview: its description holds the table of differences per bucket
            driver.get(f"{base}/#/experiments/{experiment}/runs/{parent.info.run_id}?workflowType=machine_learning")
            table = wait_for(driver, "the description's table of differences",
                             lambda d: next((t for t in _tables_text(d) if "95% interval" in t), None))
            assert "mode − mean" in table and all(label in table for label in labels), table
            assert "sum" in table and "seeds" in table
            assert "Above zero: the mode did worse than mean" in driver.execute_script("return document.body.textContent")
            # a plot among the parent's artifacts, shown as an image (decoded: it has a width)
            plot = wait_for(driver, "the plot in the description",
                            lambda d: [i for i in _images(d, "paired_difference.png") if i["complete"] and i["width"] > 0])
            assert plot[0]["width"] > 100
            if SHOTS:  # the whole description
                driver.execute_script("const b = [...document.querySelectorAll('button,span,a')]"
                                      ".find(e => e.textContent.trim() === 'Show more'); if (b) b.click();")
            _shot(driver, "parent_overview", scroll_to="Description")

            # 3. the report the description links: MLflow's artifact view shows it with its plots
            report = driver.execute_script("return [...document.querySelectorAll('a')].find(a => "
                                           "a.textContent.trim() === 'analysis/report.html').href")
            driver.get(report)
            wait_for(driver, "the report in the model-training view", lambda d: "Model metrics" in page_text(d))
            assert "Evaluation runs" not in page_text(driver)  # not the GenAI view
            frame = wait_for(driver, "the report's frame", lambda d: d.find_elements("tag name", "iframe"))[0]
            driver.switch_to.frame(frame)
            shown = wait_for(driver, "the report's plots", lambda d: [i for i in _images(d, "data:image/png")
                                                                     if i["complete"] and i["width"] > 100])
            assert len(shown) == len(list((sweep_dir / "analysis").glob("*.png"))), shown  # every plot of the report
            driver.switch_to.default_content()
            _shot(driver, "report")

            # 4. the two children selected and compared: MLflow's parallel-coordinates plot of mode
            # against each bucket's validation loss, the metrics picked as a user would
            ids = json.dumps([r.info.run_id for r in children]).replace(" ", "")
            driver.get(f"{base}/#/compare-runs?runs={ids}&experiments=[\"{experiment}\"]&workflowType=machine_learning")
            wait_for(driver, "the compare view", lambda d: "Show diff only" in page_text(d))
            _close_assistant(driver)
            buckets = sorted(k for k in children[0].data.metrics if k.startswith("val/token_loss/b"))
            assert len(buckets) == len(labels), buckets
            _pick_metrics(driver, buckets)
            plotted = wait_for(driver, "the parallel-coordinates plot of the buckets",
                               lambda d: all(b in d.execute_script("return document.querySelector('.js-plotly-plot')"
                                                                   ".textContent") for b in buckets) and buckets)
            assert "reduce_loss" in driver.execute_script("return document.querySelector('.js-plotly-plot').textContent")
            _shot(driver, "compare_children")

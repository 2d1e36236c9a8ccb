"""The Ray dashboard of the token-auth three-region cluster, opened in a real headless browser.

Debian's chromium, driven by Selenium through Debian's chromedriver (both given by path, so
Selenium's driver manager downloads nothing). The test answers the "Authentication Token
Required" dialog as a user would (a wrong token first, then the cluster's), then finds the
platform's job on the Jobs page, the nodes and their regions on the Cluster page, the Serve
application on the Serve page and the training run's actors on the Actors page (Ray 2.60's
dashboard has no page for Train runs).

Screenshots go to the test's tmp dir; with MLPLATFORM_SCREENSHOTS=DIR they go to DIR, e.g.
    MLPLATFORM_SCREENSHOTS=cluster_configs/observability/screenshots \
        pytest tests/integration/test_dashboard_browser.py
(the README's pictures). Skipped, with the reason, where chromium or chromedriver is missing:
`make chromium` installs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import REPO

# Overridable, to point at another system build (or at nothing, to see the skip).
CHROMIUM = os.environ.get("MLPLATFORM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("MLPLATFORM_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"

_missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
if _missing:
    pytest.skip(f"Requires: Debian's chromium and chromium-driver ({', '.join(_missing)} not found; "
                "`make chromium` or `apt-get install chromium chromium-driver`)", allow_module_level=True)
pytest.importorskip("selenium", reason="Requires: selenium (the dev extras: pip install -e '.[dev]')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from serve_models import register_digits, serve_on_free_port  # noqa: E402

# With `make test-slow`: a job, a Serve app and a browser session on top of `make test`'s 25 minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WAIT_S = 60  # the dashboard polls its APIs every few seconds; a busy 2-core machine is slow
APP = "dashboard-digits"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    target = os.environ.get("MLPLATFORM_SCREENSHOTS")
    if not target:
        return tmp_path_factory.mktemp("screenshots")
    path = Path(target) if Path(target).is_absolute() else REPO / target
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def scene(three_region_cluster, trained_digits, tmp_path_factory):
    """What a user would have done before opening the dashboard: trained (the session's
    `trained_digits` run), submitted a job with `ray job submit` and deployed a Serve app.
    Yields the job's submission id; Serve is shut down after."""
    import ray
    from ray import serve

    from mlplatform.serve import build_app

    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    submission_id = f"hello-{uuid.uuid4().hex[:8]}"
    # The job runs while Serve deploys: the two take about as long as either.
    job = subprocess.Popen(
        [ray_cli, "job", "submit", "--submission-id", submission_id, "--working-dir", ".", "--",
         "python", "jobs/hello.py"],
        cwd=REPO, env={**os.environ, **three_region_cluster.env()}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    work = tmp_path_factory.mktemp("dashboard")
    try:
        register_digits(work / "registry", work / "artifacts")
        serve_on_free_port(three_region_cluster)
        spec = {
            "name": APP, "model": "digits@production", "registry_root": str(work / "registry"),
            "primary": {"replicas": 1, "num_cpus": 0.5, "label_selector": {"ray.io/node-group": "cpu"}},
            "ingress": {"replicas": 1, "num_cpus": 0.1, "label_selector": {"ray.io/availability-region": "me-central-1"}},
            "auth": {"keys_dir": str(work / "keys")},
        }
        serve.run(build_app(spec), name=APP, route_prefix="/")
        out, _ = job.communicate(timeout=300)
        assert job.returncode == 0 and "succeeded" in out, out
        yield submission_id
    finally:
        if job.poll() is None:
            job.kill()
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def browser(screenshots):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # Root on a closed network: no sandbox, and none of Chromium's own background calls home.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1600,1000"):
        opts.add_argument(flag)
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlp-chromium-{uuid.uuid4().hex[:8]}"
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.screenshots = screenshots
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("textContent")


def _until(driver, condition, what: str, timeout: float = WAIT_S) -> None:
    """Wait for `condition(driver)`; on timeout fail naming `what`, with the page's text, and leave
    a screenshot of the page as it was beside the others (failed-*.png)."""
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(condition)
    except Exception:
        driver.save_screenshot(str(driver.screenshots / f"failed-{uuid.uuid4().hex[:6]}.png"))
        raise AssertionError(f"{driver.current_url}: {what} within {timeout:.0f}s; the page read: "
                             f"{_text(driver)[:1500]!r}") from None


def _wait_text(driver, *wanted: str, timeout: float = WAIT_S) -> str:
    """The page's text once it holds every one of `wanted`."""
    _until(driver, lambda d: all(w in _text(d) for w in wanted),
           f"never showed {[w for w in wanted if w not in _text(driver)]}", timeout)
    return _text(driver)


def _open(driver, cluster, page: str, *wanted: str) -> str:
    driver.get(f"{cluster.dashboard_url}/#/{page}")
    return _wait_text(driver, *wanted)


def _rows(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "tbody tr")


def _dialog_text(driver) -> str:
    return "".join(d.get_attribute("textContent") for d in driver.find_elements(By.CSS_SELECTOR, "[role=dialog]"))


def _dialog_input(driver):
    return driver.find_element(By.CSS_SELECTOR, "[role=dialog] input")


def test_token_dialog_then_jobs_nodes_serve_and_training(three_region_cluster, scene, browser, screenshots):
    cluster, driver = three_region_cluster, browser

    # The dashboard's APIs answer 401 without the token, and the UI asks for it.
    _open(driver, cluster, "overview", "Authentication Token Required")
    driver.save_screenshot(str(screenshots / "auth-dialog.png"))
    _dialog_input(driver).send_keys("not-the-token", Keys.ENTER)
    _wait_text(driver, "Invalid authentication token")
    # Select and delete, as a user would: React never hears of WebElement.clear().
    _dialog_input(driver).send_keys(Keys.CONTROL, "a")
    _dialog_input(driver).send_keys(Keys.BACKSPACE)
    _dialog_input(driver).send_keys(cluster.token())
    driver.find_element(By.XPATH, "//*[@role='dialog']//button[normalize-space()='Submit']").click()
    # Valid: the server sets its HttpOnly cookie and the page reloads without the dialog.
    _until(driver, lambda d: any(c["name"] == "ray-authentication-token" for c in d.get_cookies()),
           "no authentication cookie was set")
    _until(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, "[role=dialog]"), "the dialog stayed open")

    _open(driver, cluster, "overview", "Cluster status", scene)
    driver.save_screenshot(str(screenshots / "overview.png"))

    # Jobs: the submitted job, by its submission id, with its entrypoint, succeeded.
    jobs = _open(driver, cluster, "jobs", scene, "python jobs/hello.py", "SUCCEEDED")
    assert "Authentication Token Required" not in jobs
    driver.save_screenshot(str(screenshots / "jobs.png"))

    # Cluster: every node with its labels; region, group and market are Ray's own node labels.
    _open(driver, cluster, "cluster", "ray.io/availability-region", "eu-central-1", "me-central-1")
    driver.save_screenshot(str(screenshots / "cluster.png"))
    regions, rows = {}, [r.get_attribute("textContent") for r in _rows(driver)]
    for row in rows:  # a Labels cell previews them as JSON
        group = re.search(r'"?ray\.io/node-group"?: "?([\w.-]+)', row)
        region = re.search(r'"?ray\.io/availability-region"?: "?([\w.-]+)', row)
        if group and region:
            regions[group[1]] = region[1]
    assert regions == {"head": "me-central-1", "cpu": "me-central-1", "gpu": "me-central-1",
                       "eu": "eu-central-1"}, rows
    # The EU node's labels in full, as its Labels cell opens them.
    eu_row = next(r for r in _rows(driver) if re.search(r'node-group"?: "?eu\b', r.get_attribute("textContent")))
    labels_cell = eu_row.find_elements(By.TAG_NAME, "td")[-1]
    driver.execute_script("arguments[0].scrollIntoView({inline: 'center'})", labels_cell)
    labels_cell.find_element(By.XPATH, ".//*[normalize-space()='Expand']").click()
    _until(driver, lambda d: "ray.io/market-type: on-demand" in _dialog_text(d), "the labels dialog never opened")
    driver.save_screenshot(str(screenshots / "cluster-node-labels.png"))
    webdriver.ActionChains(driver).send_keys(Keys.ESCAPE).perform()

    # Serve: the application, running, with its deployments.
    _open(driver, cluster, "serve", APP, "RUNNING")
    driver.save_screenshot(str(screenshots / "serve.png"))
    _open(driver, cluster, f"serve/applications/{APP}", "ingress", "primary", "HEALTHY")
    driver.save_screenshot(str(screenshots / "serve-app.png"))

    # Actors: the training run's controller and workers (Ray Train), the Serve replicas, and the
    # platform's own audit writer, each under a class (and, where named, a name) a user recognises.
    _open(driver, cluster, "actors", "ServeController")
    page_size = driver.find_element(By.XPATH, "//label[normalize-space()='Page Size']/following-sibling::div//input")
    page_size.send_keys(Keys.CONTROL, "a")
    page_size.send_keys("500")
    _wait_text(driver, "TrainController", "RayTrainWorker", f"ServeReplica:{APP}:primary", "AuditWriter")
    listed = set()
    for row in _rows(driver):
        cells = [c.get_attribute("textContent").strip() for c in row.find_elements(By.TAG_NAME, "td")]
        if len(cells) > 4:
            listed.add((cells[3], cells[4]))  # Class, Name (after the ID and Worker ID columns)
    print("actors on the Actors page (class, name):", *sorted(listed), sep="\n  ")
    classes = {c for c, _ in listed}
    assert {"TrainController", "RayTrainWorker", "ServeController", "ProxyActor", f"ServeReplica:{APP}:ingress",
            f"ServeReplica:{APP}:primary"} <= classes, classes
    # The platform's own actors: the cluster's audit writer (named, one per cluster) and the
    # training run's preemption watcher, pinned to the controller's node.
    assert ("AuditWriter", "audit-writer") in listed, listed
    assert "PreemptionWatcher" in classes, classes
    driver.save_screenshot(str(screenshots / "actors.png"))
    # The training run alone: the Class filter, as a user narrows the list.
    class_filter = driver.find_element(By.XPATH, "//label[normalize-space()='Class']/following-sibling::div//input")
    class_filter.send_keys("Train")
    _until(driver, lambda d: "ServeController" not in _text(d), "the Class filter never applied")
    driver.save_screenshot(str(screenshots / "actors-train.png"))

"""The web app (kd_fracture.app) in a real browser: headless Chromium driven by Selenium 4 against the app started as
`python -m kd_fracture.app` on a tiny trained run with a student. Upload → teacher and student probabilities and their
Grad-CAM overlays; a bad file gets its own error while the good one predicts and the server keeps serving; the Runs
tab links to a report.html that opens. Screenshots land in the test's tmp dir.

Uses Debian's system binaries (apt-get install chromium chromium-driver); never downloads a browser or a driver
(the driver path is given explicitly, so Selenium Manager is not run, and SE_OFFLINE=true). Skips when selenium or
the binaries are missing."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

for _module in ("fastapi", "uvicorn", "multipart"):
    pytest.importorskip(_module, reason=f"the app needs {_module}")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
WAIT_S = 90  # CPU predictions with Grad-CAM on two models take a few seconds; generous for loaded CI machines


def _binary(*candidates: str) -> str | None:
    for c in candidates:
        found = shutil.which(c) or (c if os.path.isabs(c) and os.access(c, os.X_OK) else None)
        if found:
            return found
    return None


CHROMIUM = _binary("chromium", "/usr/bin/chromium", "chromium-browser")
CHROMEDRIVER = _binary("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


# ---- a tiny run with a student

@pytest.fixture(scope="module")
def served_run(tiny_phantom, tmp_path_factory, student_copy, app_run_builder) -> Path:
    """The app's tiny run (conftest.served_tiny_run) copied with a distilled 'student' that is the teacher's own fold
    checkpoints, laid out as distill writes it; under <tmp>/runs/phantom/ (runs/ = runs root)."""
    run = app_run_builder(tiny_phantom, tmp_path_factory.mktemp("browser"))
    return student_copy(run, run.parent / "with_student")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except OSError:
        return 0


@pytest.fixture(scope="module")
def app_url(served_run, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("app_log") / "app.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kd_fracture.app", "--run", str(served_run), "--host",
                                 "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while get_status(f"{url}/api/info") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the app did not come up (exit {proc.poll()}):\n{log.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # belt and braces: the explicit driver path already skips Selenium Manager
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, timeout: float = WAIT_S) -> WebDriverWait:
    return WebDriverWait(driver, timeout)


def images_loaded(driver, css: str, n: int):
    """Expected condition: at least n images matching css, each decoded (naturalWidth > 0)."""
    def check(d):
        imgs = d.find_elements(By.CSS_SELECTOR, css)
        ok = len(imgs) >= n and all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                                     i) for i in imgs)
        return imgs if ok else False
    return check


def predict(driver, *paths: Path) -> None:
    """Choose the files in the page's file input and press Predict; wait until the status line reports the result."""
    chooser = driver.find_element(By.ID, "files")
    driver.execute_script("arguments[0].value = ''", chooser)  # chromedriver appends to a `multiple` input's files
    chooser.send_keys("\n".join(str(p.resolve()) for p in paths))
    assert driver.execute_script("return arguments[0].files.length", chooser) == len(paths)
    driver.find_element(By.ID, "go").click()
    wait(driver).until(EC.text_to_be_present_in_element((By.ID, "status"), "predicted in"))


def prob_of(card, role: str) -> float:
    box = card.find_element(By.XPATH, f".//div[h4[normalize-space()='{role}']]")
    kv = box.find_element(By.CSS_SELECTOR, ".kv").get_attribute("textContent")  # "prob0.512 abnormal"
    match = re.match(r"\s*prob\s*([0-9.]+)\s+(normal|abnormal)\s*$", kv)
    assert match, kv
    return float(match.group(1))


def test_predict_errors_and_runs_in_a_real_browser(browser, app_url, tiny_phantom, tmp_path):
    driver = browser
    shots = tmp_path / "screenshots"
    shots.mkdir()
    good = sorted(Path(tiny_phantom).rglob("*.png"))[0]

    driver.get(app_url + "/")
    assert driver.title == "kd_fracture"
    wait(driver).until(lambda d: "teacher" in d.find_element(By.ID, "run").text.lower()
                       or "resnet10t" in d.find_element(By.ID, "run").text)
    assert "not a diagnostic device" in driver.find_element(By.ID, "disclaimer").text
    assert "cannot read" not in driver.find_element(By.ID, "run").text

    # ---- one good image: teacher and student probabilities, both Grad-CAM overlays decoded by the browser
    predict(driver, good)
    assert driver.find_element(By.ID, "status").text.startswith("1 of 1 file(s) predicted")
    rows = wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#study table tbody tr") or False)
    assert len(rows) == 2  # teacher and student study-level rows
    for row in rows:
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        assert 0.0 <= float(cells[1]) <= 1.0 and cells[2] in ("normal", "abnormal")
    cams = wait(driver).until(images_loaded(driver, "#results .card img[alt$='Grad-CAM']", 2))
    assert sorted(i.get_attribute("alt") for i in cams) == ["student Grad-CAM", "teacher Grad-CAM"]
    card = driver.find_element(By.CSS_SELECTOR, "#results .card")
    assert good.name in card.find_element(By.TAG_NAME, "h3").text
    teacher, student = prob_of(card, "teacher"), prob_of(card, "student")
    assert 0.0 <= teacher <= 1.0
    assert student == pytest.approx(teacher, abs=1e-3)  # the fake student is the teacher's own weights
    assert card.find_elements(By.CSS_SELECTOR, "img[alt='uploaded image']")  # the local preview
    assert driver.save_screenshot(str(shots / "predict.png"))

    # ---- a text file named bad.png next to a good image: its own error; the good one predicts
    bad = tmp_path / "bad.png"
    bad.write_text("this is a text file, not a radiograph\n")
    predict(driver, bad, good)
    assert driver.find_element(By.ID, "status").text.startswith("1 of 2 file(s) predicted")
    cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
    assert [c.find_element(By.TAG_NAME, "h3").text for c in cards] == ["bad.png", good.name]
    error = cards[0].find_element(By.CSS_SELECTOR, ".error").text
    assert "not an image" in error
    assert not cards[0].find_elements(By.TAG_NAME, "img")
    assert 0.0 <= prob_of(cards[1], "teacher") <= 1.0
    wait(driver).until(images_loaded(driver, "#results .card img[alt$='Grad-CAM']", 2))
    assert driver.save_screenshot(str(shots / "bad_file.png"))
    assert get_status(f"{app_url}/api/info") == 200  # the server is still up

    # ---- Runs tab: the runs with their numbers, and a report.html link that opens
    driver.find_element(By.ID, "tab-runs").click()
    assert not driver.find_element(By.ID, "runs").get_attribute("hidden")
    assert driver.find_element(By.ID, "predict").get_attribute("hidden")
    links = wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#runs-table a[href$='report.html']")
                               or False)
    table = driver.find_element(By.ID, "runs-table").text
    assert "phantom/with_student (served)" in table and "phantom/resnet10t" in table
    assert "runs under" in driver.find_element(By.ID, "runs-root").text
    assert driver.save_screenshot(str(shots / "runs.png"))
    main = driver.current_window_handle
    href = links[0].get_attribute("href")
    links[0].click()  # target=_blank: a new tab
    wait(driver).until(lambda d: len(d.window_handles) == 2)
    driver.switch_to.window(next(h for h in driver.window_handles if h != main))
    wait(driver).until(lambda d: d.current_url == href and d.execute_script("return document.readyState")
                       == "complete")
    assert href.startswith(app_url + "/runs/phantom/") and href.endswith("/report.html")
    assert driver.find_element(By.TAG_NAME, "body").text.strip()
    assert driver.save_screenshot(str(shots / "report.png"))
    driver.close()
    driver.switch_to.window(main)
    assert get_status(f"{app_url}/api/info") == 200
    assert sorted(p.name for p in shots.iterdir()) == ["bad_file.png", "predict.png", "report.png", "runs.png"]


# ---- optuna-dashboard on a study made by the project (issue 13: the metric is named, not "Objective 0")

def _dashboard_text(driver, url: str) -> str:
    """The rendered text of a study page once its history plot has drawn (the SPA renders after its API calls)."""
    driver.get(url)
    wait(driver).until(lambda d: "Intermediate values" in d.execute_script("return document.body.innerText")
                       and "trial #1" in d.execute_script("return document.body.innerText"))
    return driver.execute_script("return document.body.innerText")


def test_dashboard_names_the_metric_and_shows_per_epoch_curves(browser, tmp_path):
    import warnings

    import optuna

    from kd_fracture import search
    from kd_fracture.config import SearchConfig

    db = tmp_path / "studies.db"
    storage = f"sqlite:///{db}"

    def objective(trial):  # per-epoch reports, as distill's objective makes them (step = fold × epochs + epoch)
        x = trial.suggest_float("kd.alpha", 0.0, 1.0)
        for step in range(4):
            trial.report(x * (step + 1) / 4, step)
        return x

    warnings.simplefilter("ignore")
    ours = search.open_study(SearchConfig(study="phantom-resnet50-hybrid_s/kd", metric="study_auroc",
                                          pruner="none"), storage)
    ours.optimize(objective, n_trials=3)
    bare = optuna.create_study(study_name="bare", storage=storage, direction="maximize")  # negative control
    bare.optimize(objective, n_trials=3)

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kd_fracture.dashboard", "--storage", storage, "--port",
                             str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while get_status(f"{url}/api/studies") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, "the dashboard did not come up"
            time.sleep(0.3)
        ids = {s.study_name: s._study_id for s in optuna.study.get_all_study_summaries(storage)}
        named = _dashboard_text(browser, f"{url}/dashboard/studies/{ids[ours.study_name]}")
        browser.save_screenshot(str(tmp_path / "dashboard_named.png"))
        unnamed = _dashboard_text(browser, f"{url}/dashboard/studies/{ids['bare']}")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert "study_auroc" in named and "Objective 0" not in named
    assert all(f"trial #{n}" in named for n in range(3))  # the intermediate-value plot has every trial's curve
    assert "Objective 0" in unnamed and "study_auroc" not in unnamed  # the check can fail

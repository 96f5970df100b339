"""The live dashboard and the simulate report in a real browser, during one real simulate run.

One `skipfleet simulate --keep-running` (3 fan devices, a run on request, on the session's Ray)
serves every test here: Debian's headless chromium, driven by Selenium through Debian's
chromedriver, reads the coordinator's dashboard while the fleet runs, sees a fault injected with
`skipfleet fleet` arrive on its own, and opens the report the run wrote. Screenshots are kept
under the test's tmp dir and copied to out/screenshots/. The run ends with SIGTERM, which
--keep-running answers by stopping everything in order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "out" / "screenshots"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DASHBOARD_LINE = re.compile(r"the fleet keeps running: dashboard (http://\S+/dashboard)")
CLOCK_TICK = re.compile(r"\d\d:\d\d:\d\d")
WAIT_S = 30.0


@pytest.fixture(scope="module")
def live(tmp_path_factory, ray_session, data_dir):
    """(dashboard URL, run dir, the result JSON) of a simulate that keeps running. Two runs: a
    scenario of one lasts about 2 s here, too short for the report's time axis to show its
    steps (test_the_report_stands_alone_with_legends_scaled_units_and_every_round)."""
    tmp = tmp_path_factory.mktemp("live")
    out = tmp / "simulate.out"
    argv = [sys.executable, "-m", "skipfleet.cli", "simulate", "--devices", "3",
            "--dataset", "fan", "--runs", "2", "--max-rounds", "2", "--data-dir", str(data_dir),
            "--run-dir", str(tmp / "run"), "--json", str(tmp / "result.json"),
            "--report", str(tmp / "report.html"), "--timeout", "120", "--keep-running",
            "--ray-address", ray_session.get_runtime_context().gcs_address]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(out, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = _wait_for_dashboard(process, out)
        yield url, tmp / "run", json.loads((tmp / "result.json").read_text()), tmp
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, out.read_text()[-3000:]
    assert "stopping the fleet" in out.read_text()
    final = json.loads((tmp / "result.json").read_text())  # rewritten once all stopped
    assert final["retained_cleared"], "the agents' retained presence was removed at the end"


def _wait_for_dashboard(process, out: Path) -> str:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = DASHBOARD_LINE.search(out.read_text())
        if found:
            return found.group(1)
        assert process.poll() is None, f"simulate ended:\n{out.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no dashboard line:\n{out.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        assert os.access(path, os.X_OK), (
            f"{path} is missing: apt-get install {package} (deploy/install-system-deps.sh)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_until(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"the page never showed {what}")


def screenshot(driver, tmp: Path, name: str) -> None:
    """The whole page, kept with the test's files and in out/screenshots/."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, height + 50)
    time.sleep(0.3)  # the charts resize
    path = tmp / f"{name}.png"
    driver.save_screenshot(str(path))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOTS / path.name)
    driver.set_window_size(1400, 1000)


def js(driver, script: str):
    return driver.execute_script(script)


CHART_INFO = """
const c = Chart.getChart(arguments[0]);
return {labels: c.data.datasets.map(d => d.label),
        colours: c.data.datasets.map(d => d.borderColor || d.backgroundColor),
        points: c.data.datasets.map(d => d.data.length),
        x: c.scales.x.ticks.map(t => String(t.label)),
        y: c.scales.y.ticks.map(t => String(t.label)),
        yTitle: c.options.scales.y.title.text,
        legend: c.legend.legendItems.map(i => i.text)};
"""


def chart(driver, canvas_id: str) -> dict:
    return driver.execute_script(CHART_INFO, canvas_id)


def test_the_dashboard_shows_each_device_online_with_what_it_runs_why_and_its_charts(live, browser):
    url, _run_dir, result, tmp = live
    browser.get(url)
    wait_until(lambda: js(browser, "return Number(document.body.dataset.updates || 0)") >= 2,
               "two polls of /dashboard/state")  # fmt: skip
    rows = js(
        browser,
        """return [...document.querySelectorAll('#devices tbody tr')]
        .map(r => [...r.cells].map(c => c.textContent));""",
    )
    names = sorted(d["device"] for d in result["per_device"])
    assert [r[0] for r in rows] == names
    by_name = {d["device"]: d for d in result["per_device"]}
    for row in rows:
        assert row[1] == "online"
        assert row[5].split(" ")[0] == by_name[row[0]]["runs"]  # v5 (fleet), personal, base
        assert row[6] == by_name[row[0]]["why"]  # why it runs what it runs
        assert row[7].endswith("%")  # the accuracy it measured
        assert row[9].endswith(" W") and row[11] == "0"  # power; nothing waits in its spool
    for canvas in ("chart-drift", "chart-power", "chart-spool"):
        info = chart(browser, canvas)
        assert info["legend"] == names and len(set(info["colours"])) == len(names)
        assert all(n >= 3 for n in info["points"]), info  # heartbeats over time
        assert info["x"] and all(CLOCK_TICK.fullmatch(t) for t in info["x"]), info["x"]
    power = chart(browser, "chart-power")
    assert power["yTitle"] == "power (W)"
    assert all(re.fullmatch(r"\d+(\.\d)?", t) for t in power["y"]), power["y"]  # 0.5, not 0.4999
    accuracy = chart(browser, "chart-accuracy")
    assert set(accuracy["labels"]) == set(names) and all(n >= 1 for n in accuracy["points"])
    assert accuracy["y"][-1] == "100 %"
    screenshot(browser, tmp, "dashboard")


def test_the_dashboard_shows_each_canary_devices_accuracy_and_the_decision(live, browser):
    url, _run_dir, result, _tmp = live
    browser.get(url)
    wait_until(lambda: js(browser, "return document.querySelectorAll('#rollouts tbody tr').length"),
               "the rollouts")  # fmt: skip
    rows = js(
        browser,
        """return [...document.querySelectorAll('#rollouts tbody tr')]
        .map(r => [...r.cells].map(c => c.textContent));""",
    )
    expected = [
        (f"v{r['candidate_version']}", c["device"], c["candidate"], c["current"])
        for r in result["rollouts"]
        for c in r["canaries"]
    ]
    assert expected, "a run of 3 fan devices puts the two 12 cm fans' version behind a canary"
    version = None
    shown = []
    for row in rows:
        version = row[0].split(" ")[0] or version
        shown.append((version, row[3], row[4], row[5]))
    assert [(v, d) for v, d, *_ in shown] == [(v, d) for v, d, *_ in expected]
    for (_, _, candidate, current), (*_, want_candidate, want_current) in zip(
        shown, expected, strict=True
    ):
        assert candidate == f"{want_candidate * 100:.1f} %"
        assert current == f"{want_current * 100:.1f} %"
    decision = rows[0][2]
    assert decision in ("promoted", "rolled back")
    assert decision.replace(" ", "_").upper() == result["rollouts"][0]["state"]
    rounds = js(browser, "return document.querySelectorAll('#rounds tbody tr').length")
    assert rounds == sum(r["rounds"] for r in result["runs"])


def test_a_fault_injected_with_skipfleet_fleet_arrives_on_the_open_page(live, browser):
    url, run_dir, result, tmp = live
    browser.get(url)
    wait_until(lambda: js(browser, "return Number(document.body.dataset.updates || 0)") >= 1,
               "a first poll")  # fmt: skip
    device = sorted(d["device"] for d in result["per_device"])[0]
    fleet = [sys.executable, "-m", "skipfleet.cli", "fleet", "--run-dir", str(run_dir / "fleet")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([*fleet, "pause", device], check=True, env=env, capture_output=True)
    try:
        text = f"fault: pause {device}"
        wait_until(lambda: text in browser.find_element("id", "timeline").text,
                   f"'{text}' on the timeline")  # fmt: skip
        kinds = js(browser, "return [...document.querySelectorAll('#timeline li')]"
                   ".map(li => li.dataset.kind)")  # fmt: skip
        assert {"fault", "run", "round", "canary"} <= set(kinds)
        assert {"promotion", "rollback"} & set(kinds)  # the canary's decision
        screenshot(browser, tmp, "dashboard-fault")
    finally:
        subprocess.run([*fleet, "resume", device], check=True, env=env, capture_output=True)


def test_the_report_stands_alone_with_legends_scaled_units_and_every_round(live, browser):
    _url, _run_dir, result, tmp = live
    page = (tmp / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from the network
    browser.get((tmp / "report.html").as_uri())
    wait_until(lambda: js(browser, "return document.body.dataset.charts") == "drawn", "charts")
    names = [d["device"] for d in result["per_device"]]
    accuracy = chart(browser, "chart-accuracy")
    assert accuracy["legend"] == ["before any fine-tune", "after its own fine-tune",
                                  "running at the end"]  # fmt: skip
    tune = chart(browser, "chart-tune")
    seconds = [d["finetune_seconds"] for d in result["per_device"] if d["finetune_seconds"]]
    assert tune["yTitle"] == ("fine-tune time (ms)" if max(seconds) < 1 else "fine-tune time (s)")
    energy = chart(browser, "chart-energy")
    joules = [d["joules"] for d in result["per_device"] if d["joules"]]
    assert energy["yTitle"] == ("energy (mJ)" if max(joules) < 1 else "energy (J)")
    for ticks in (tune["y"], energy["y"]):  # round steps, no 0.0289-style labels
        assert all(re.fullmatch(r"\d+(\.\d)?", t) for t in ticks), ticks
    drift = chart(browser, "chart-drift")
    assert sorted(drift["legend"]) == sorted(names)
    steps = {_seconds(t) for t in drift["x"]}
    assert len(steps) == len(drift["x"]) >= 3  # whole seconds on one step: 0 s, 5 s, 10 s
    gaps = {b - a for a, b in zip(sorted(steps), sorted(steps)[1:], strict=False)}
    assert len(gaps) == 1 and gaps.pop() in (1, 2, 5, 10, 15, 30, 60, 120, 300), drift["x"]
    rounds = chart(browser, "chart-rounds")
    for run in result["runs"]:  # every round of every cluster: its start and each aggregate
        for name, c in run["clusters"].items():
            i = rounds["labels"].index(f"run {run['run'][:8]} {name}")
            assert rounds["points"][i] == len(c["measured"]) == c["rounds"]
    overflow = js(browser, "return document.documentElement.scrollWidth - "
                  "document.documentElement.clientWidth")  # fmt: skip
    assert overflow <= 0  # nothing runs off the page's side
    labels_inside = js(
        browser,
        """const c = Chart.getChart('chart-accuracy');
        return c.scales.x.bottom <= c.height && c.scales.x.right <= c.width;""",
    )
    assert labels_inside  # the last bar group's device names are not cut off
    screenshot(browser, tmp, "report")


def _seconds(label: str) -> int:
    """'45 s' or '2:30' (the report's time ticks) in seconds; anything else fails."""
    found = re.fullmatch(r"(\d+) s|(\d+):(\d\d)", label)
    assert found, f"time tick {label!r}"
    if found.group(1):
        return int(found.group(1))
    return 60 * int(found.group(2)) + int(found.group(3))


def test_twenty_devices_get_twenty_distinct_colours(live, browser):
    _url, _run_dir, _result, tmp = live
    browser.get((tmp / "report.html").as_uri())
    wait_until(lambda: js(browser, "return document.body.dataset.charts") == "drawn", "charts")
    colours = js(browser, "return [...Array(21).keys()].map(i => SkipCharts.colour(i))")
    assert len(set(colours[:20])) == 20
    dashes = js(
        browser,
        """const names = [...Array(21).keys()].map(i => 'd' + i);
        const canvas = document.createElement('canvas'); document.body.append(canvas);
        const s = Object.fromEntries(names.map(n => [n, [[0, 1], [5, 2]]]));
        const c = SkipCharts.timeChart(canvas, s, {yTitle: 'x', unit: '', names});
        return Object.fromEntries(c.data.datasets.map(d => [d.label, d.borderDash.length]));""",
    )
    assert [dashes[f"d{i}"] for i in range(20)] == [0] * 20
    assert dashes["d20"] > 0  # the 21st: the first colour again, dashed

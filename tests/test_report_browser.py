"""report.html in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by
selenium opens the demo's page and a sweep's. No console errors and nothing fetched; one chain element per
probed layer; the details that hovering or clicking shows equal report.json's numbers; the tables sort.
Screenshots are saved under the test's temporary folder. Skipped, saying so, only where no browser is
installed (never in CI, which installs it)."""

import importlib.util
import json
import os
import re
import shutil

import numpy as np
import pytest
from test_cli import invoke, small_npz
from test_diagnostics import planted_report
from test_figures import branchy_report
from test_sweep import save_checkpoints

from probecore.html_report import DATA_ID, report_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromium-driver", DRIVER)) if not found]
    missing += [] if importlib.util.find_spec("selenium") else ["selenium (the dev extra)"]
    if missing:
        reason = f"no headless browser here: {', '.join(missing)} missing (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI installs the browser (.ci/run), yet {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))  # Debian's driver: nothing downloaded
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def sweep_results(tmp_path_factory, demo_arrays):
    """`probe sweep` of four layers of the demo model before and after training, with the control task, on 600
    digits."""
    folder = tmp_path_factory.mktemp("sweep")
    checkpoints = save_checkpoints(folder, np.random.default_rng(7))
    data = small_npz(folder / "d.npz", demo_arrays)
    result = invoke("sweep", *checkpoints, "--data", data, "--out", folder / "sweep", "--control", "--no-cache",
                    "--layers", "pixels,relu2,relu3,logits", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    return folder / "sweep"


def open_page(browser, path):
    """Load ``path``; return what the page logged as errors and what it fetched beyond itself."""
    browser.get_log("browser")  # drop what an earlier page logged
    browser.get(path.as_uri())
    errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return errors, [name for name in fetched if not name.startswith("data:")]


def hover(browser, element):
    from selenium.webdriver.common.action_chains import ActionChains

    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    ActionChains(browser).move_to_element(element).perform()


def details(browser) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    return {field.get_attribute("data-field"): field.text for field in browser.find_elements(By.CSS_SELECTOR, "#details dd")}


def percents(text):
    return [float(number) for number in re.findall(r"(-?[0-9]+\.[0-9]+)%", text)]


def assert_details_match(shown, layer, report):
    """The details panel against report.json's layer: every number as shown (percent to 2 decimals)."""
    assert shown["name"] == layer["name"] and shown["shape"] == "x".join(map(str, layer["shape"]))
    assert shown["op"].startswith(layer["op_type"]) and shown["reduction"] == layer["reduction"]["description"]
    assert shown["features"] == f"{layer['features_used']} of {layer['features']}"
    assert float(shown["l2"]) == pytest.approx(layer["fit"]["l2"], rel=0.05)
    for split in ("train", "valid", "test"):
        metrics = layer["metrics"][split]
        expected = [100 * metrics["error"], *(100 * bound for bound in metrics["error_ci95"])]
        assert percents(shown[f"error-{split}"]) == pytest.approx(expected, abs=0.0051)
    if layer["control"] is None:
        assert shown["selectivity"].startswith("no control task")
    else:
        selectivity = float(shown["selectivity"].split(" points")[0])
        assert selectivity == pytest.approx(100 * layer["control"]["selectivity"], abs=0.0051)
        assert percents(shown["selectivity"]) == pytest.approx([100 * layer["control"]["metrics"]["test"]["error"]], abs=0.0051)
    messages = [finding["message"] for finding in report["diagnostics"] if layer["name"] in finding["layers"]]
    assert all(message in shown["findings"] for message in messages) and (messages or shown["findings"] == "none")


def assert_each_layer_box_matches_report(browser, folder):
    """Open ``folder``'s report.html: no console error, nothing fetched, one chain box per layer of its
    report.json, and each box's details equal to that layer's numbers. (report, the boxes)."""
    from selenium.webdriver.common.by import By

    report = json.loads((folder / "report.json").read_text())
    errors, fetched = open_page(browser, folder / "report.html")
    assert errors == [] and fetched == []
    chain = browser.find_elements(By.CSS_SELECTOR, "svg.chain g[data-layer]")
    assert [box.get_attribute("data-layer") for box in chain] == [layer["name"] for layer in report["layers"]]
    for box, layer in zip(chain, report["layers"]):
        hover(browser, box)
        assert_details_match(details(browser), layer, report)
    return report, chain


def column(browser, table, index):
    from selenium.webdriver.common.by import By

    return [row.find_elements(By.TAG_NAME, "td")[index] for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")]


def test_the_demos_report_answers_hover_click_and_sorting(browser, demo_results, tmp_path):
    from selenium.webdriver.common.by import By

    report, chain = assert_each_layer_box_matches_report(browser, demo_results)
    chain[2].click()  # pinned: stays when the pointer moves off the layers
    hover(browser, browser.find_element(By.TAG_NAME, "h1"))
    assert details(browser)["name"] == report["layers"][2]["name"]
    assert "pinned" in chain[2].get_attribute("class")

    table = browser.find_element(By.CSS_SELECTOR, "table.sortable")
    headers = {header.text: header for header in table.find_elements(By.TAG_NAME, "th")}
    test_errors = {layer["name"]: layer["metrics"]["test"]["error"] for layer in report["layers"]}
    for direction in ("ascending", "descending"):
        headers["test"].click()
        assert headers["test"].get_attribute("aria-sort") == direction
        order = [cell.text for cell in column(browser, table, 1)]
        assert sorted(order) == sorted(test_errors)
        shown = [test_errors[name] for name in order]
        assert shown == sorted(shown, reverse=direction == "descending")
    headers["#"].click()
    assert [cell.text for cell in column(browser, table, 1)] == [layer["name"] for layer in report["layers"]]
    hover(browser, table.find_element(By.CSS_SELECTOR, 'tr[data-layer="relu3"]'))
    assert details(browser)["name"] == "relu3"
    assert browser.save_screenshot(str(tmp_path / "demo-report.png"))

    browser.get((demo_results / "report.html").as_uri() + "#0/pool2")  # a link to a layer opens it pinned
    browser.refresh()
    assert details(browser)["name"] == "pool2"


def test_a_sweeps_page_shows_each_layer_at_each_checkpoint(browser, sweep_results, tmp_path):
    from selenium.webdriver.common.by import By

    sweep = json.loads((sweep_results / "sweep.json").read_text())
    errors, fetched = open_page(browser, sweep_results / "report.html")
    assert errors == [] and fetched == []
    cells = browser.find_elements(By.CSS_SELECTOR, "table.grid td[data-layer]")
    assert len(cells) == len(sweep["layers"]) * len(sweep["checkpoints"])
    last = sweep["reports"][-1]
    chain = browser.find_elements(By.CSS_SELECTOR, "svg.chain g[data-layer]")
    assert [box.get_attribute("data-layer") for box in chain] == [layer["name"] for layer in last["layers"]]
    for cell in cells[::3] + cells[-1:]:
        index = int(cell.get_attribute("data-report"))
        report = sweep["reports"][index]
        layer = next(layer for layer in report["layers"] if layer["name"] == cell.get_attribute("data-layer"))
        hover(browser, cell)
        shown = details(browser)
        assert shown["checkpoint"] == sweep["checkpoints"][index] and layer["control"] is not None
        assert_details_match(shown, layer, report)
        assert float(cell.text) == pytest.approx(100 * layer["metrics"]["test"]["error"], abs=0.051)

    grid = browser.find_element(By.CSS_SELECTOR, "table.grid")
    trained = next(h for h in grid.find_elements(By.TAG_NAME, "th") if h.get_attribute("textContent") == sweep["checkpoints"][-1])
    trained.click()
    values = [float(cell.get_attribute("data-value")) for cell in column(browser, grid, 1 + len(sweep["checkpoints"]))]
    assert values == sorted(values) and len(values) == len(sweep["layers"])
    assert browser.save_screenshot(str(tmp_path / "sweep-report.png"))


def test_many_layers_branches_and_findings_in_the_browser(browser, tmp_path, rng):
    """A generated 81-layer model with branches and side gates, and a report with a dead segment: one box
    per layer, each layer's role and findings in its details."""
    from selenium.webdriver.common.by import By

    for name, report in (("branchy", branchy_report(rng, 81)), ("planted", planted_report())):
        page = tmp_path / f"{name}.html"
        page.write_text(report_html(report))
        expected = json.loads(report.to_json())
        errors, fetched = open_page(browser, page)
        assert errors == [] and fetched == []
        data = json.loads(browser.find_element(By.ID, DATA_ID).get_attribute("textContent"))
        assert [layer["name"] for layer in data["reports"][0]["layers"]] == [layer["name"] for layer in expected["layers"]]
        chain = browser.find_elements(By.CSS_SELECTOR, "svg.chain g[data-layer]")
        assert len(chain) == len(report.layers)
        roles = [layer.role for layer in report.layers]
        for role in dict.fromkeys(roles):
            index = roles.index(role)
            hover(browser, chain[index])
            shown = details(browser)
            assert_details_match(shown, expected["layers"][index], expected)
            assert shown["op"] == ("Relu" if role == "main" else f"Relu ({role})")
        dead = expected["diagnostics"][0]["layers"][0] if expected["diagnostics"] else None
        if dead:
            hover(browser, chain[[layer.name for layer in report.layers].index(dead)])
            assert expected["diagnostics"][0]["message"] in details(browser)["findings"]
        assert browser.save_screenshot(str(tmp_path / f"{name}.png"))


@pytest.mark.parametrize("kind", ["branchy", "torch-exported"])
def test_a_report_of_a_model_built_as_users_bring_them_in_the_browser(browser, tmp_path, rng, kind):
    """`probe run` on a branchy convnet (a residual add, a swish written as x * sigmoid(x)) and on one written
    as torch's exporter writes it (weights in model.onnx.data, input [N, 3, H, W]): its report.html has one box
    per probed layer, each with report.json's numbers and the role the graph gives it."""
    from onnx_models import save_convnet, save_open_convnet
    from selenium.webdriver.common.by import By

    if kind == "branchy":
        model, x = save_convnet(tmp_path / "model.onnx", rng, channels=6, size=10), rng.normal(size=(300, 3, 10, 10))
    else:
        model, x = save_open_convnet(tmp_path / "model.onnx", rng, external_data=True), rng.normal(size=(300, 3, 20, 20))
        assert (tmp_path / "model.onnx.data").exists()
    x = x.astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=(x[:, 0].mean(axis=(1, 2)) > 0).astype(int) + (x[:, 1, 0, 0] > 0))
    layers = ["--layers", "relu,conv2,block,gate,swish,pool,logits"] if kind == "branchy" else []
    result = invoke("run", model, "--data", tmp_path / "data.npz", "--out", tmp_path / "out", "--no-cache", "--quiet", *layers)
    assert result.exit_code == 0, result.output
    assert_each_layer_box_matches_report(browser, tmp_path / "out")
    if kind == "branchy":  # the graph's branches reach the page: some layer is off the main path
        data = json.loads(browser.find_element(By.ID, DATA_ID).get_attribute("textContent"))
        assert {layer["role"] for layer in data["reports"][0]["layers"]} == {"main", "branch", "side"}
    assert browser.save_screenshot(str(tmp_path / f"{kind}.png"))

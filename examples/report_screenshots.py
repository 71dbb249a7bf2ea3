"""Screenshots of report.html for docs/: the demo's page with relu3's details open, and the 131-layer sweep of
the paper's Figure 6 network with layers.63 (the end of its dead first half) after 2 000 steps open.

    probe demo --out /tmp/probe-demo
    probe report docs/pathological_mlp      # the sweep's pages again from its sweep.json (a few seconds)
    python examples/report_screenshots.py /tmp/probe-demo docs/pathological_mlp --out docs/

Needs Debian's chromium and chromium-driver and selenium (the dev extra); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CENTRE_PINNED = """
const pinned = document.querySelector(".pinned");
const box = pinned.closest(".scroll");
if (box) {
  box.scrollTop += pinned.getBoundingClientRect().top - box.getBoundingClientRect().top - box.clientHeight / 2;
}
window.scrollTo(0, 0);
"""


def screenshot(driver, page: Path, layer: str, out: Path) -> None:
    """``page`` opened at ``#layer`` (pinned), from the top of the page with the layer in the middle of its
    scrolling box, saved as a 256-colour PNG."""
    driver.get(f"{page.resolve().as_uri()}#{layer}")
    driver.execute_script(CENTRE_PINNED)
    png = driver.get_screenshot_as_png()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo", type=Path, help="the folder `probe demo` wrote")
    parser.add_argument("sweep", type=Path, help="the folder of the pathological MLP's sweep")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--hide-scrollbars", "--window-size=1400,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        screenshot(driver, args.demo / "report.html", "0/relu3", args.out / "report_demo.png")
        screenshot(driver, args.sweep / "report.html", "2/layers.63", args.out / "report_sweep_131_layers.png")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()

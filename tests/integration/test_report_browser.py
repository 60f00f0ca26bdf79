"""The job report in a real browser: Debian's headless Chromium (through its ChromeDriver) renders
`tessera report`'s page of a real job with a complete and a failed scene, offline; every scene,
its error, its quicklook and the charts are there, and nothing is fetched from anywhere.

Skips when Chromium or ChromeDriver is absent (`make test` installs Debian's `chromium` and
`chromium-driver` where it runs as root with apt; elsewhere: `apt install chromium chromium-driver`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipelines.run.job import run_job
from pipelines.tools.report import write_report
from tests.helpers import job_spec, oracle_checkpoint, smooth_scene, write_geotiff

pytestmark = pytest.mark.usefixtures("ray_local")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _browser(download_dir: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,1600",
                 "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: no host resolves
                 f"--user-data-dir={download_dir / 'profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER,
                                                             log_output=os.devnull))


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Chromium and ChromeDriver (Debian: chromium, "
                                                            "chromium-driver)")
def test_the_report_renders_in_headless_chromium_with_every_scene_and_image(tmp_path):
    good = write_geotiff(tmp_path / "river delta.tif", smooth_scene((150, 173), seed=1, nodata_border=20))
    other = write_geotiff(tmp_path / "farmland.tif", smooth_scene((96, 80), seed=2))
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00 not really a tiff")
    root = tmp_path / "out"
    result = run_job(job_spec([good, other, bad], root, oracle_checkpoint(tmp_path / "model")), base_dir=tmp_path)
    assert {s.name: s.status for s in result.scenes} == {"river_delta": "complete", "farmland": "complete",
                                                         "broken": "failed"}
    page = write_report(root)
    driver = _browser(tmp_path)
    try:
        driver.get(page.as_uri())
        driver.execute_script("return document.fonts.ready")
        text = driver.execute_script("return document.body.innerText")
        for name in ("river_delta", "farmland", "broken"):
            assert name in text
        assert "2 complete" in text and "1 failed" in text and "broken.tif" in text  # the failure and its file
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight, "
            "i.getBoundingClientRect().width])")
        assert len(images) == 2  # one quicklook per complete scene
        assert all(done and w > 0 and h > 0 and shown > 0 for _, done, w, h, shown in images), images
        charts = driver.execute_script(
            "return Array.from(document.querySelectorAll('svg')).map(s => s.getBoundingClientRect().width)")
        assert charts and all(w > 0 for w in charts)
        # nothing but the page itself was loaded: images are data URIs, no script/style/font fetched
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(r => r.name)")
        assert [u for u in fetched if not u.startswith("data:")] == []
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        import numpy as np
        from PIL import Image

        with Image.open(shot) as img:
            pixels = np.asarray(img.convert("RGB").resize((64, 64))).reshape(-1, 3)
            assert img.size[0] >= 1000 and len(np.unique(pixels, axis=0)) > 20  # a page, not a blank
        if os.environ.get("TESSERA_REPORT_SCREENSHOT"):  # keep it for a person to look at
            driver.set_window_size(1200, int(driver.execute_script("return document.body.scrollHeight")) + 40)
            driver.save_screenshot(os.environ["TESSERA_REPORT_SCREENSHOT"])
    finally:
        driver.quit()

"""The demo page in a real headless Chromium (Debian's ``chromium``, driven by Playwright): `rwkvunet demo` on a
free port, an image and a NIfTI volume segmented, the slice slider moved, the labels NIfTI downloaded, a corrupt
upload answered on the page; and the Space folder's app.py serving the same page.

Screenshots go to the test's tmp folder. With RWKVUNET_UPDATE_SCREENSHOT=1 the README's screenshot,
tests/screenshots/demo.png, is rewritten, showing a model trained for a few hundred steps here first, or the
model folder RWKVUNET_SCREENSHOT_MODEL names (e.g. the README quick start's runs/rwkvunet-t-synthetic).
"""
from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from demo_model import make_model_folder
from rwkvunet.data.synthetic import SYNTHETIC_CLASSES, make_synthetic_image
from rwkvunet.demo.examples import example_volume
from rwkvunet.inference_io import overlay

nib = pytest.importorskip("nibabel")
sync_api = pytest.importorskip("playwright.sync_api")
if importlib.util.find_spec("gradio") is None:  # the servers import it, this process need not
    pytest.skip("the demo needs gradio (rwkvunet[demo])", allow_module_level=True)

UPDATE = os.environ.get("RWKVUNET_UPDATE_SCREENSHOT", "") == "1"
README_SCREENSHOT = REPO / "tests" / "screenshots" / "demo.png"
TIMEOUT_MS = 120_000


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        msg = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; CI must run the browser test")
        pytest.skip(msg)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def _wait_served(proc, url: str, log: Path, timeout: float = 180.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "config", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


class Server:
    def __init__(self, args, cwd: Path, log: Path, port: int, **env):
        self.url, self.log = f"http://127.0.0.1:{port}/", log
        self.proc = subprocess.Popen(args, cwd=cwd, env=_env(**env), stdout=log.open("w"), stderr=subprocess.STDOUT)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_browser")
    if UPDATE and os.environ.get("RWKVUNET_SCREENSHOT_MODEL"):
        model = Path(shutil.copytree(os.environ["RWKVUNET_SCREENSHOT_MODEL"], folder / "model"))
    else:
        model = make_model_folder(folder / "model", train_steps=200 if UPDATE else 0)
    # the two servers start together: the command, and the Space's app.py
    assert subprocess.run([sys.executable, "-m", "rwkvunet.cli", "demo", str(model), "--write-space",
                           str(folder / "space")], env=_env(), capture_output=True).returncode == 0
    port, space_port = _free_port(), _free_port()
    server = Server([sys.executable, "-m", "rwkvunet.cli", "demo", str(model), "--port", str(port),
                     "--device", "cpu"], folder, folder / "demo.log", port)
    space = Server([sys.executable, "app.py"], folder / "space", folder / "space.log", space_port,
                   GRADIO_SERVER_PORT=str(space_port), GRADIO_SERVER_NAME="127.0.0.1")
    try:
        _wait_served(server.proc, server.url, server.log)
        _wait_served(space.proc, space.url, space.log)
        yield folder, server, space
    finally:
        server.stop()
        space.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _upload(page, path: Path) -> None:
    """Upload as a user does: clear the previous file (its clear button), then choose the new one."""
    chooser = page.locator("#upload input[type=file]")
    if chooser.count() == 0:
        page.locator("#upload").get_by_role("button", name="Clear").first.click()
        chooser.wait_for(state="attached", timeout=TIMEOUT_MS)
    chooser.set_input_files(str(path))


def _wait_status(page, text: str) -> str:
    page.wait_for_function("([sel, text]) => document.querySelector(sel)?.innerText.includes(text)",
                           arg=["#status", text], timeout=TIMEOUT_MS)
    return page.locator("#status").inner_text()


def _shown(page, selector: str) -> np.ndarray:
    """The pixels an image view shows, fetched from the server as the browser did."""
    src = page.locator(f"{selector} img").get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def test_page_in_chromium(work, browser):
    folder, server, _ = work
    shots = folder / "screenshots"
    shots.mkdir()
    png = folder / "shapes.png"
    Image.fromarray(make_synthetic_image(21, 96)[0]).save(png)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-25.0, 40.0, 7.5]
    volume = example_volume()[:, :, :6]
    nib.save(nib.Nifti1Image(volume, affine), str(folder / "stack.nii.gz"))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))

    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page.goto(server.url)
    page.wait_for_selector("#upload input[type=file]", state="attached", timeout=TIMEOUT_MS)
    page.screenshot(path=str(shots / "0_start.png"), full_page=True)

    # an image: overlay beside the input, legend, time and device; the overlay is predict's for these labels
    _upload(page, png)
    status = _wait_status(page, "Segmented in")
    assert "shapes.png: image 96x96 (uint8)" in status and "on cpu (float32)" in status
    page.wait_for_selector("#overlay-view img", timeout=TIMEOUT_MS)
    legend = page.locator("#legend").inner_text()
    assert all(name in legend for name in SYNTHETIC_CLASSES) and "pixels" in legend
    with page.expect_download() as download:
        page.locator("#download a").first.click()
    labels = np.asarray(Image.open(download.value.path()))
    assert labels.shape == (96, 96)
    shown, image = _shown(page, "#overlay-view"), np.asarray(Image.open(png))
    zoom = shown.shape[0] // 96
    np.testing.assert_array_equal(shown[::zoom, ::zoom], overlay(image, labels, 0.5))
    np.testing.assert_array_equal(_shown(page, "#input-view")[::zoom, ::zoom, 0], image)
    assert not page.locator("#slice").is_visible()
    page.screenshot(path=str(shots / "1_image.png"), full_page=True)

    # a NIfTI volume: the slice slider appears; moving it shows another slice
    _upload(page, folder / "stack.nii.gz")
    status = _wait_status(page, "stack.nii.gz: volume 64x64x6")
    assert "6 slices along axis 2" in status and "min-max" in status
    assert "volume (mL)" in page.locator("#legend").inner_text()
    slider = page.locator("#slice input[type=range]")
    slider.wait_for(state="visible", timeout=TIMEOUT_MS)
    before, start = _shown(page, "#input-view"), int(slider.input_value())
    target = 0 if start > 2 else 5
    number = page.locator("#slice input[type=number]")
    number.fill(str(target))
    number.press("Enter")
    page.wait_for_function("(v) => document.querySelector('#slice input[type=range]').value == v", arg=str(target),
                           timeout=TIMEOUT_MS)
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    after = before
    while np.array_equal(after, before) and time.monotonic() < deadline:
        page.wait_for_timeout(250)
        after = _shown(page, "#input-view")
    zoom = after.shape[0] // 64
    shown_slice = volume[:, :, target]  # the view scales the slice to 8 bits, as predict's montage does
    lo, hi = shown_slice.min(), shown_slice.max()
    expected = np.clip((shown_slice - lo) / (hi - lo) * 255.0 + 0.5, 0, 255)
    np.testing.assert_allclose(after[::zoom, ::zoom, 0], expected, atol=1)  # float32 against float64 rounding
    page.screenshot(path=str(shots / "2_volume.png"), full_page=True)

    # the labels NIfTI keeps the input's shape and affine
    with page.expect_download() as download:
        page.locator("#download a").first.click()
    saved = folder / "downloaded_labels.nii.gz"
    download.value.save_as(str(saved))
    labels = nib.load(str(saved))
    assert labels.shape == volume.shape and labels.get_data_dtype() == np.uint8
    np.testing.assert_allclose(labels.affine, affine)

    # a corrupt upload: a message on the page, and the page goes on serving
    _upload(page, folder / "corrupt.png")
    status = _wait_status(page, "Error")
    assert "corrupt.png: cannot read the image" in status
    page.screenshot(path=str(shots / "3_error.png"), full_page=True)
    _upload(page, png)
    _wait_status(page, "shapes.png: image 96x96")

    if UPDATE:
        _readme_screenshot(page)


def _readme_screenshot(page) -> None:
    """The page as it opens on its example volume (clicked, as a visitor would), legend and volumes in view."""
    page.set_viewport_size({"width": 1200, "height": 1000})
    page.locator("#upload").get_by_role("button", name="Clear").first.click()
    page.get_by_role("button", name="synthetic_stack.nii.gz").first.click()
    _wait_status(page, "synthetic_stack.nii.gz: volume 64x64x16")
    page.wait_for_timeout(1500)
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True, clip={"x": 0, "y": 0, "width": 1200,
                                                                       "height": 1010})))
    README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shot.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(README_SCREENSHOT, optimize=True)


def test_space_app_serves_the_same_page(work, browser):
    """The Space's app.py serves the page `rwkvunet demo` serves: the same components, and it segments."""
    import json
    import urllib.request

    folder, server, space = work

    def components(url):
        with urllib.request.urlopen(url + "config", timeout=30) as reply:
            config = json.load(reply)
        return sorted((c["type"], str(c.get("props", {}).get("elem_id")), str(c.get("props", {}).get("label")))
                      for c in config["components"])

    assert components(space.url) == components(server.url)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(space.url)
    page.wait_for_selector("#upload input[type=file]", state="attached", timeout=TIMEOUT_MS)
    png = folder / "space_shapes.png"
    Image.fromarray(make_synthetic_image(22, 64)[0]).save(png)
    _upload(page, png)
    assert "on cpu" in _wait_status(page, "space_shapes.png: image 64x64")
    page.screenshot(path=str(folder / "screenshots" / "4_space.png"), full_page=True)

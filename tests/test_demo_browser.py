"""The Gradio demo, driven in a real browser (Debian's headless Chromium via Playwright), plus its helpers.

The browser tests start ``python -m tokenprune.cli demo`` on a free localhost port (once per module).
Classification tab: pick an example, check both result panels (different GFLOPs), move the token-map layer
slider, upload a text file (error box, results cleared), then a real photo (the app still works). The
segmentation (DToP) and VQA tabs get the same treatment: an example renders both panels with fewer GFLOPs for
the reduced model; a bad upload / an empty question shows a message and the app keeps serving (each skips if
its zoo model is not installed). The VQA tab also lists every registered VLM method, counts merged groups in its
token map's caption, and shows a budget a method refuses as a message. The page must never ask for anything
outside localhost. Tests skip only when /usr/bin/chromium (``apt-get install chromium``) or the ``playwright``
package is missing; ``playwright install`` is never needed.

The screenshots go to the tests' tmp dirs; ``TOKENPRUNE_UPDATE_SCREENSHOT=1`` also writes ``docs/demo.png``,
``docs/demo_segmentation.png`` and ``docs/demo_vqa.png`` (the README's pictures), so an ordinary run leaves the
work tree clean. ``TOKENPRUNE_DEMO_MODEL`` picks the classifier (default ``auto``: the zoo model, else its
backbone with an untrained head).
"""

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

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune
from tokenprune import demo
from tokenprune.measure.accuracy import example_images
from tokenprune.methods.variants import is_control

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOCAL_PREFIXES = ("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:", "about:")


# ------------------------------------------------------------------------------------ helpers, no browser


def test_read_image_rejects_bad_input_clearly(tmp_path: Path) -> None:
    with pytest.raises(demo.InputError, match="No image yet"):
        demo.read_image(None)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n")
    with pytest.raises(demo.InputError, match=r"notes\.txt is not an image"):
        demo.read_image(text)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(demo.InputError, match=r"empty\.png is not an image"):
        demo.read_image(empty)
    huge = tmp_path / "huge.png"
    Image.new("1", (7000, 6000)).save(huge)  # 42 MP, a few KB on disk; only its header is read
    with pytest.raises(demo.InputError, match=r"7000×6000 pixels = 42\.0 megapixels"):
        demo.read_image(huge)


def test_read_image_downscales_large_photos(tmp_path: Path) -> None:
    wide = tmp_path / "wide.jpg"
    Image.new("RGB", (3000, 1500), (200, 100, 50)).save(wide)
    image = demo.read_image(wide)
    assert image.mode == "RGB" and image.size == (demo.MAX_SIDE, demo.MAX_SIDE // 2)
    assert demo.read_image(example_images()[0]).mode == "RGB"


def test_token_map_groups_merged_and_dropped_patches() -> None:
    # 1 protected token + a 2x2 grid; current tokens: [cls, {p0, p1}, {p3}]; p2 was dropped.
    source = torch.tensor(
        [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]],
        dtype=torch.float32,
    )
    groups = demo.groups_from_source(source, num_protected=1, grid=(2, 2))
    assert groups.tolist() == [[1, 1], [-1, 2]]
    crop = np.zeros((4, 4, 3), dtype=np.uint8)
    crop[:2, :2] = (200, 0, 0)  # p0 red
    crop[:2, 2:] = (0, 0, 100)  # p1 blue
    crop[2:, 2:] = (0, 250, 0)  # p3 green
    picture = demo.render_token_map(crop, groups, cell=10)
    assert picture.shape == (20, 20, 3)
    assert picture[5, 5].tolist() == [100, 0, 50]  # p0 and p1 share their average colour
    assert picture[5, 15].tolist() == [100, 0, 50]
    assert picture[15, 5].tolist() == list(demo.DROPPED_RGB)  # dropped
    assert np.abs(picture[15, 15].astype(int) - [0, 250, 0]).max() <= 10  # a token of its own: the image
    assert picture[0, 5].tolist() == list(demo.EDGE_RGB) or picture[9, 5].tolist() == list(demo.EDGE_RGB)


# --------------------------------------------------------------------------------------------- browser


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the demo exited with {process.returncode} before serving:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the demo did not serve {url} within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def _gflops(text: str) -> float:
    match = re.search(r"([0-9.]+) (?:LLM prefill )?GFLOPs", text)
    assert match, f"no GFLOPs figure in {text!r}"
    return float(match.group(1))


@pytest.fixture
def sync_api():
    """Playwright's sync API, or a skip saying what is missing."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's Chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)")
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory):
    """A demo server on a free localhost port (one for the module's browser tests), stopped afterwards."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's Chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "tokenprune.cli", "demo", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--model", os.environ.get("TOKENPRUNE_DEMO_MODEL", "auto")]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_serving(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_demo_in_browser(sync_api, demo_url: str, tmp_path: Path) -> None:
    expect = sync_api.expect
    timeout = 120_000  # ms: a CPU run is a few seconds, but CI machines can be busy

    outside: list[str] = []

    def local_only(route) -> None:
        url = route.request.url
        if url.startswith(LOCAL_PREFIXES):
            route.continue_()
        else:  # the page must work offline: record and refuse anything else
            outside.append(url)
            route.abort()

    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not an image\n")
    photo = next(p for p in example_images() if p.stem == "chelsea")

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(timeout)
            page.route("**/*", local_only)
            page.goto(demo_url, wait_until="domcontentloaded")
            examples = page.locator("#tp-examples button[aria-label^='Thumbnail']")
            expect(examples).to_have_count(len(example_images()), timeout=timeout)
            orig_stats, red_stats = page.locator("#tp-orig-stats"), page.locator("#tp-red-stats")
            error = page.locator("#tp-error")

            # 0. Run with no image: a clear message, nothing else.
            page.locator("#tp-run").click()
            expect(error).to_contain_text("No image yet", timeout=timeout)

            # 1. An example: both panels render, with different GFLOPs.
            examples.nth(0).click()
            expect(red_stats).to_contain_text("GFLOPs", timeout=timeout)
            expect(orig_stats).to_contain_text("GFLOPs", timeout=timeout)
            original, reduced = _gflops(orig_stats.inner_text()), _gflops(red_stats.inner_text())
            assert reduced < original, (original, reduced)
            for label in ("#tp-orig-label", "#tp-red-label"):
                expect(page.locator(label)).to_contain_text("%", timeout=timeout)
            expect(page.locator("#tp-map img")).to_be_visible(timeout=timeout)
            expect(page.locator("#tp-map-caption")).to_contain_text("tokens", timeout=timeout)
            expect(error).to_have_text(re.compile(r"^\s*$"), timeout=timeout)

            # 2. A text file: a clear message in the page, stale results cleared.
            page.locator("#tp-upload input[type=file]").set_input_files(str(text_file))
            expect(error).to_contain_text("notes.txt is not an image", timeout=timeout)
            expect(red_stats).not_to_contain_text("GFLOPs", timeout=timeout)

            # 3. The app still works: a real photo through the same upload box, then the layer slider.
            page.locator("#tp-upload input[type=file]").set_input_files(str(photo))
            expect(red_stats).to_contain_text("GFLOPs", timeout=timeout)
            expect(error).to_have_text(re.compile(r"^\s*$"), timeout=timeout)
            assert _gflops(red_stats.inner_text()) < _gflops(orig_stats.inner_text())
            layer = page.locator("#tp-layer input[type=number]")
            layer.fill("6")
            layer.press("Enter")
            expect(page.locator("#tp-map-caption")).to_contain_text("After layer 6", timeout=timeout)
            expect(page.locator("#tp-map img")).to_be_visible(timeout=timeout)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#tp-map img, #tp-orig-image img')]"
                ".every(img => img.complete && img.naturalWidth > 0)"
            )

            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert outside == [], f"the page tried to reach outside localhost: {outside}"
        finally:
            browser.close()
    _keep_screenshot(shot, "demo.png")


def _keep_screenshot(shot: Path, name: str) -> None:
    """With ``TOKENPRUNE_UPDATE_SCREENSHOT=1``, copy a screenshot to ``docs/<name>`` (the README's pictures)."""
    assert shot.stat().st_size > 10_000
    if os.environ.get("TOKENPRUNE_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / name)


def _open_page(sync_api, playwright, url: str, timeout: int, outside: list[str]):
    """A Chromium page on the demo that refuses (and records) every request outside localhost."""

    def local_only(route) -> None:
        if route.request.url.startswith(LOCAL_PREFIXES):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(timeout)
    page.route("**/*", local_only)
    page.goto(url, wait_until="domcontentloaded")
    return browser, page


def _skip_without_tab(page, name: str, timeout: int) -> None:
    tab = page.get_by_role("tab", name=name)
    try:
        tab.wait_for(timeout=timeout)
    except Exception:
        pytest.skip(f"the demo has no {name!r} tab (its zoo model is not installed)")
    tab.click()


def test_segmentation_tab_in_browser(sync_api, demo_url: str, tmp_path: Path) -> None:
    """DToP tab: an example at a low threshold renders both maps with fewer GFLOPs after early exit."""
    expect, timeout, outside = sync_api.expect, 180_000, []
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not an image\n")
    with sync_api.sync_playwright() as playwright:
        browser, page = _open_page(sync_api, playwright, demo_url, timeout, outside)
        try:
            _skip_without_tab(page, "Segmentation (DToP)", 60_000)
            threshold = page.locator("#tp-seg-threshold input[type=number]")
            threshold.fill("0.6")  # read when the example is clicked: many tokens exit early
            threshold.press("Tab")
            page.locator("#tp-seg-examples button[aria-label^='Thumbnail']").nth(0).click()
            original, reduced = page.locator("#tp-seg-orig-stats"), page.locator("#tp-seg-red-stats")
            expect(reduced).to_contain_text("GFLOPs", timeout=timeout)
            expect(original).to_contain_text("GFLOPs", timeout=timeout)
            assert _gflops(reduced.inner_text()) < _gflops(original.inner_text())
            for image in ("#tp-seg-orig-map img", "#tp-seg-red-map img", "#tp-seg-stages img"):
                expect(page.locator(image)).to_be_visible(timeout=timeout)
            expect(page.locator("#tp-seg-legend")).to_contain_text("after block", timeout=timeout)
            page.locator("#tp-seg-upload input[type=file]").set_input_files(str(text_file))
            expect(page.locator("#tp-seg-error")).to_contain_text("notes.txt is not an image", timeout=timeout)
            expect(reduced).not_to_contain_text("GFLOPs", timeout=timeout)
            page.locator("#tp-seg-upload input[type=file]").set_input_files(str(example_images()[0]))
            expect(reduced).to_contain_text("GFLOPs", timeout=timeout)  # still serving after the bad upload
            page.screenshot(path=str(tmp_path / "segmentation.png"), full_page=True)
        finally:
            browser.close()
    assert outside == [], f"the page tried to reach outside localhost: {outside}"
    _keep_screenshot(tmp_path / "segmentation.png", "demo_segmentation.png")


def _choose(page, dropdown: str, option: str, timeout: int) -> None:
    """Pick ``option`` in the Gradio dropdown ``dropdown`` (a CSS selector of its block)."""
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=option, exact=True).click(timeout=timeout)


def test_vqa_tab_in_browser(sync_api, demo_url: str, tmp_path: Path) -> None:
    """VQA tab: every registered method listed; an example question answered by both models, the reduced one
    with fewer LLM GFLOPs; the map's caption counts merged groups; a budget a method refuses is a message."""
    from tokenprune.demo.vqa import TAB_NAME, VQA_MODELS, budget_control, vqa_methods, zoo_module

    expect, timeout, outside = sync_api.expect, 180_000, []
    methods = vqa_methods()
    installed = [name for name in VQA_MODELS if zoo_module(name).MODEL_DIR.is_dir()]
    merging = next(m for m in ("visionzip", "aim") if m in methods)  # a method that merges before the LLM
    with sync_api.sync_playwright() as playwright:
        browser, page = _open_page(sync_api, playwright, demo_url, timeout, outside)
        try:
            _skip_without_tab(page, TAB_NAME, 60_000)
            page.locator("#tp-vqa-method input").click()  # the dropdown lists every registered VLM method
            listed = page.get_by_role("option")
            expect(listed).to_have_count(len(methods), timeout=timeout)
            assert listed.evaluate_all("options => options.map(o => o.getAttribute('aria-label'))") == list(methods)
            page.get_by_role("option", name=merging, exact=True).click()  # the list is open: pick from it
            expect(page.locator("#tp-vqa-method-note")).to_contain_text(merging, timeout=timeout)
            page.locator("#tp-vqa-examples button[aria-label^='Thumbnail']").nth(0).click()
            original, reduced = page.locator("#tp-vqa-orig-stats"), page.locator("#tp-vqa-red-stats")
            expect(reduced).to_contain_text("GFLOPs", timeout=timeout)
            expect(original).to_contain_text("GFLOPs", timeout=timeout)
            assert _gflops(reduced.inner_text()) < _gflops(original.inner_text())
            expect(page.locator("#tp-vqa-orig-answer")).not_to_be_empty(timeout=timeout)
            expect(page.locator("#tp-vqa-red-answer")).not_to_be_empty(timeout=timeout)
            expect(page.locator("#tp-vqa-map img")).to_be_visible(timeout=timeout)
            caption = page.locator("#tp-vqa-caption")
            expect(caption).to_contain_text("Visual tokens entering LLM layer", timeout=timeout)
            merged = re.search(r"(\d+) merged groups hold (\d+) patches", caption.inner_text())
            assert merged and int(merged.group(1)) > 0, caption.inner_text()  # merging shows as groups
            # An empty question: a clear message in the page, and the app keeps serving.
            page.locator("#tp-vqa-q textarea").fill("   ")
            page.locator("#tp-vqa-run").click()
            expect(page.locator("#tp-vqa-error")).to_contain_text("Type a question", timeout=timeout)
            page.locator("#tp-vqa-q textarea").fill("what shape is in the image?")
            page.locator("#tp-vqa-run").click()
            expect(reduced).to_contain_text("GFLOPs", timeout=timeout)
            expect(page.locator("#tp-vqa-error")).to_have_text(re.compile(r"^\s*$"), timeout=timeout)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#tp-vqa-map img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            page.screenshot(path=str(tmp_path / "vqa.png"), full_page=True)
            # A budget below what a method reaches on this prompt: its message in the page, the app keeps serving.
            refusing = next(m for m in ("fastv", "random_visual") if m in methods)
            assert budget_control(refusing).option == "flops"
            _choose(page, "#tp-vqa-method", refusing, timeout)
            budget = page.locator("#tp-vqa-budget input[type=number]")
            budget.fill("0.14")
            budget.press("Tab")
            page.locator("#tp-vqa-run").click()
            expect(page.locator("#tp-vqa-error")).to_contain_text(f"{refusing} with flops=0.14", timeout=timeout)
            expect(reduced).not_to_contain_text("GFLOPs", timeout=timeout)
            budget.fill("0.6")
            budget.press("Tab")
            page.locator("#tp-vqa-run").click()
            expect(reduced).to_contain_text("GFLOPs", timeout=timeout)
            expect(page.locator("#tp-vqa-error")).to_have_text(re.compile(r"^\s*$"), timeout=timeout)
            # The model dropdown: every installed VQA model; another one brings its examples and token grid.
            page.locator("#tp-vqa-model input").click()
            listed = page.get_by_role("option")
            expect(listed).to_have_count(len(installed), timeout=timeout)
            assert listed.evaluate_all("options => options.map(o => o.getAttribute('aria-label'))") == installed
            page.keyboard.press("Escape")
            if "llava-scenes" in installed:
                _choose(page, "#tp-vqa-model", "llava-scenes", timeout)
                expect(page.locator("#tp-vqa-model-note")).to_contain_text("576 visual tokens", timeout=timeout)
                expect(reduced).not_to_contain_text("GFLOPs", timeout=timeout)  # the last answers are cleared
                _choose(page, "#tp-vqa-method", merging, timeout)
                page.locator("#tp-vqa-examples button[aria-label^='Thumbnail']").nth(0).click()
                expect(reduced).to_contain_text("GFLOPs", timeout=timeout)
                expect(caption).to_contain_text("from 576 patches", timeout=timeout)
                expect(page.locator("#tp-vqa-orig-answer")).not_to_be_empty(timeout=timeout)
        finally:
            browser.close()
    assert outside == [], f"the page tried to reach outside localhost: {outside}"
    _keep_screenshot(tmp_path / "vqa.png", "demo_vqa.png")


def test_vqa_scene_examples_are_test_scenes_with_questions_of_every_family() -> None:
    from PIL import Image

    from tokenprune.demo.vqa import VQA_MODELS, demo_examples, zoo_module
    from tokenprune.zoo import scenes

    examples, source = demo_examples("llava-scenes")
    assert source == "test scenes" and len(examples) == 6
    families = []
    for (path, question), seed in zip(examples, scenes.split_scenes("test", 6), strict=True):
        with Image.open(path) as image:
            assert image.size == (336, 336)
        (match,) = [q for q in scenes.questions_for(scenes.make_scene(seed)) if q.question == question]
        families.append(match.family)
    assert len(set(families)) == 6  # a question of another family on each scene
    assert [zoo_module(name).MODEL_NAME for name in VQA_MODELS] == list(VQA_MODELS)
    with pytest.raises(ValueError, match="valid: llava-easyvqa, llava-scenes"):
        zoo_module("llava-unknown")


def test_vqa_and_segmentation_inputs_are_checked_before_any_forward(tmp_path: Path) -> None:
    """Empty/too long questions, unknown methods and non-images give InputError messages, not tracebacks."""
    from types import SimpleNamespace

    from tokenprune.demo.segmentation import SegmentationDemo
    from tokenprune.demo.vqa import MAX_QUESTION_CHARS, VQADemo
    from tokenprune.zoo import easyvqa

    config = SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=2), image_token_id=4)
    vqa = VQADemo(SimpleNamespace(config=config), processor=None, module=easyvqa)
    photo = str(example_images()[0])
    with pytest.raises(demo.InputError, match="Type a question"):
        vqa.compare(photo, "  ", "aim", 0.5)
    with pytest.raises(demo.InputError, match=f"at most {MAX_QUESTION_CHARS}"):
        vqa.compare(photo, "why " * 100, "aim", 0.5)
    vlm_methods = [m for m in tokenprune.methods(kind="vlm") if not is_control(m)]  # the dropdown's choices
    with pytest.raises(demo.InputError, match=re.escape(f"choose one of {', '.join(vlm_methods)}.")):
        vqa.compare(photo, "what color?", "no_such_method", 0.5)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(demo.InputError, match="notes.txt is not an image"):
        vqa.compare(str(text), "what color?", "aim", 0.5)
    with pytest.raises(demo.InputError, match="notes.txt is not an image"):
        SegmentationDemo(model=None, transform=None).compare(str(text), 0.95, 5)

"""The web app in a real browser: `python -m launch.app --config=smoke` on 127.0.0.1, driven by
Playwright in headless Chromium from Debian's packages (`apt-get install chromium`; Playwright's
own browser download cannot work offline).

A user uploads examples/coffee.png, paints a stroke over the cup, types a prompt, asks for 2
samples and runs: 2 ranked results appear with their distances, the status states the edit window
and its scale, and the mask used, at the photo's size, covers the stroke and nothing far from it.
A large photo of another shape (the coffee photo enlarged to 1600 x 900) is edited at its own size:
the best result, downloaded from the page, is 1600 x 900 and equal to the upload farther than the
feather from the mask. An empty mask then gives its one-line message, and the server
still serves further requests: one is cancelled after a batch while another user's waits in the
queue, its position shown, then runs, compiling its new configuration first (a stage the page
shows). Beforehand, a stroke begun beside the photo (in the editor's margin) paints from the photo's
edge; a clicked result is compared with the photo, used as the next photo and edited again; a
run shows its predictions changing while it samples; and a run reloaded mid-way is reopened from
the browser's history. The server is stopped by its PID. Set
BDJAX_APP_SCREENSHOT=path to keep the screenshot taken after the large photo's run (docs/app.png).
"""

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from bdjax import painting, smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COFFEE = os.path.join(ROOT, "examples", "coffee.png")
# Chromium as this machine runs it as root with no network beyond loopback.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STROKE = ((180, 110), (280, 110))  # over the cup, in the photo's pixels (480 x 320)
BIG = (1600, 900)  # the coffee photo enlarged to a large photo of another shape
BIG_STROKE = ((600, 310), (930, 310))  # over the cup, in its pixels
EDGE_STROKE = ((-25, 60), (70, 60))  # begun 25 photo pixels left of the photo, in the editor's margin


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("the browser test needs Debian's Chromium: apt-get install -y chromium")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """launch.app as a subprocess; its output is collected by a thread."""

    def __init__(self, tmp, port: int):
        from jax import config

        self.home, self.workdir, self.out = tmp / "home", tmp / "work", tmp / "out"
        for d in (self.home, self.workdir):
            d.mkdir()
        cache = tmp / "bdjax_cache"
        cache.mkdir()
        os.symlink(config.jax_compilation_cache_dir, cache / "xla_cache")  # the suite's compiled programs
        env = {**os.environ, "PYTHONPATH": ROOT, "HOME": str(self.home), "BDJAX_CACHE": str(cache),
               "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
        env.pop("GRADIO_TEMP_DIR", None)
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launch.app", "--config=smoke", f"--port={port}", f"--output_dir={self.out}",
             "--num_samples=2"], cwd=self.workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not any(line.startswith("serving on ") for line in self.lines):
            assert self.proc.poll() is None, f"the app stopped:\n{self.log[-3000:]}"
            assert time.monotonic() < deadline, f"the app did not start in {timeout} s:\n{self.log[-3000:]}"
            time.sleep(0.5)

    def stop(self) -> int:
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("app"), free_port())
    try:
        server.wait_ready()
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#photo canvas", timeout=60_000)
    return page


def upload_photo(page, path=COFFEE) -> dict:
    """Upload the photo at `path`; returns where its pixels are on the screen (scale, left, top).
    The page puts it in the editor framed by a transparent margin (painting.framed) and says so."""
    page.locator("#photo input[type=file]").set_input_files(str(path))
    with Image.open(path) as photo:
        width, height = photo.size
    wait_status(page, rf"^photo {width}x{height} loaded", 60)
    return framed_at(page, (width, height))


def framed_at(page, size) -> dict:
    """Where the pixels of a photo of `size`, framed in the editor, are on the screen."""
    width, height = size
    margin = painting.margin_for(size)
    framed = (width + 2 * margin, height + 2 * margin)
    zoom = page.locator("#photo").get_by_text(re.compile(r"^\d+%$"))
    zoom.wait_for(timeout=30_000)
    page.wait_for_timeout(700)  # the canvas settles on its zoom
    box = page.locator("#photo canvas").first.bounding_box()
    # The zoom shown is rounded to a percent: the framed photo's width on the canvas is more exact
    # when it fills it (a large photo, shown zoomed out).
    scale = int(zoom.inner_text()[:-1]) / 100
    if abs(framed[0] * scale - box["width"]) <= framed[0] * 0.005 + 1:
        scale = box["width"] / framed[0]
    # The editor shows the framed photo centred in its canvas at the zoom it shows.
    return {"scale": scale, "left": box["x"] + (box["width"] - framed[0] * scale) / 2 + margin * scale,
            "top": box["y"] + (box["height"] - framed[1] * scale) / 2 + margin * scale}


def paint(page, at: dict, stroke=STROKE, steps: int = 20) -> None:
    """Drag the brush (the editor's tool once a photo is in) along `stroke`, in photo pixels."""
    screen = lambda x, y: (at["left"] + x * at["scale"], at["top"] + y * at["scale"])  # noqa: E731
    (x0, y0), (x1, y1) = stroke
    page.mouse.move(*screen(x0, y0))
    page.mouse.down()
    for i in range(1, steps + 1):
        page.mouse.move(*screen(x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps))
    page.mouse.up()


def run_edit(page, prompt: str, samples: int) -> None:
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#num-samples input").fill(str(samples))
    page.locator("#run").click()


def wait_status(page, pattern: str, timeout: float = 240) -> str:
    """The status line once it matches `pattern` (regular expression)."""
    deadline = time.monotonic() + timeout
    while True:
        text = page.locator("#status").inner_text()
        if re.search(pattern, text):
            return text
        assert time.monotonic() < deadline, f"status never matched {pattern!r}; it says {text!r}"
        page.wait_for_timeout(250)


def record_status(page) -> None:
    """Keep every text the status element shows, in window.statusLog (a stage may be brief)."""
    page.evaluate("""() => {
        const status = document.querySelector("#status");
        window.statusLog = [];
        new MutationObserver(() => window.statusLog.push(status.innerText))
            .observe(status, {subtree: true, childList: true, characterData: true});
    }""")


def score_rows(page, columns: int = 8) -> list[list[float]]:
    """The score table's rows as shown (its label, the headers up to "seam", then the cells row by row)."""
    cells = [t.strip() for t in page.locator("#scores").inner_text().split("\n") if t.strip() not in ("", "⋮")]
    values = [float(v) for v in cells[cells.index("seam") + 1:]]
    return [values[i:i + columns] for i in range(0, len(values), columns)]


def captions(page) -> list[str]:
    return [c.inner_text() for c in page.locator("#results .caption-label").all()]


def fetch(page, url: str, mode: str = "RGB") -> np.ndarray:
    response = page.request.get(url)
    assert response.ok, url
    return np.asarray(Image.open(io.BytesIO(response.body())).convert(mode))


def fetch_png(page, selector: str) -> np.ndarray:
    return fetch(page, page.locator(f"{selector} img").first.get_attribute("src"), "L")


def downloads(page) -> dict:
    """The download links' file names and URLs, in the order shown."""
    hrefs = [link.get_attribute("href") for link in page.locator("#downloads a[href]").all()]
    return {os.path.basename(href): href for href in hrefs}


def check_mask_near(mask: np.ndarray, stroke, radius: float) -> None:
    """`mask` ([H, W] bool, in photo pixels) covers the `stroke`'s centre line and nothing
    farther than `radius` from it."""
    ys, xs = np.nonzero(mask)
    assert distance_to_stroke(np.stack([xs + 0.5, ys + 0.5], axis=1), stroke).max() < radius
    (x0, y), (x1, _) = stroke
    assert mask[int(y), int(x0) + 1:int(x1)].all()
    assert mask.mean() < 0.2


def distance_to_stroke(points: np.ndarray, stroke=STROKE) -> np.ndarray:
    """Distance of photo-pixel `points` [N, 2] (x, y) to the stroke's segment."""
    a, b = np.asarray(stroke, float)
    t = np.clip(((points - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
    return np.linalg.norm(points - (a + t[:, None] * (b - a)), axis=1)


def test_enter_submits_and_the_error_shows_by_the_button_without_scrolling(server):
    """At 1280x800 (a laptop) and on a narrow phone-sized screen, Enter in the prompt submits, and
    the status (here the error for a missing photo) appears under the edit button, in view."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            for width, height in ((1280, 800), (420, 900)):
                page = browser.new_page(viewport={"width": width, "height": height})
                page.goto(server.url, wait_until="domcontentloaded")
                page.wait_for_selector("#photo canvas", timeout=60_000)
                page.locator("#prompt textarea").fill("a cup of tea")
                page.locator("#prompt textarea").press("Enter")
                assert wait_status(page, r"error") == "error: no image: upload a photo to edit first"
                run, status = (page.locator(s).bounding_box() for s in ("#run", "#status"))
                assert 0 <= run["y"] < status["y"] and status["y"] + status["height"] <= height, (width, run, status)
                page.close()
        finally:
            browser.close()


def test_paint_from_beside_the_photo_keep_editing_a_result_and_reopen_a_run_after_a_reload(server):
    """A stroke begun in the editor's margin, beside the photo, paints its part on the photo; a
    clicked result is compared with the photo, then used as the next photo and edited again; a
    reload mid-run leaves the run to end (ranked after its current batch), and this browser's
    history reopens it, results and inputs."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = open_page(browser, server.url)  # its storage (this browser's id) is kept over reloads
            paint(page, upload_photo(page), EDGE_STROKE)
            run_edit(page, "a cup of green tea", 2)
            assert wait_status(page, r"results ranked|error").startswith("2 results ranked")
            mask = fetch_png(page, "#mask-used") > 0
            check_mask_near(mask, ((0, EDGE_STROKE[0][1]), EDGE_STROKE[1]), 60)
            assert mask[EDGE_STROKE[0][1], 0]  # from the photo's very edge

            # The second result clicked: before/after shows it against the photo; then it is the photo.
            files = downloads(page)
            ranked = [name for name in files if re.fullmatch(r"\d{3}_\d+\.\d{4}\.png", name)]
            second = fetch(page, files[ranked[1]])
            page.locator("#results .thumbnail-item").nth(1).click()
            page.wait_for_function("document.querySelectorAll('#compare img').length == 2", timeout=30_000)
            page.locator("#use").click()
            wait_status(page, r"^result #1 is now the photo")
            paint(page, framed_at(page, (480, 320)))
            run_edit(page, "a cup of coffee", 2)
            assert wait_status(page, r"results ranked|error").startswith("2 results ranked")
            np.testing.assert_array_equal(fetch(page, downloads(page)["source.png"]), second)

            # Reloaded mid-run: the run ends after its current batch; the history reopens it.
            run_edit(page, "a cup of tea", 6)
            # While a batch samples, its current predictions show in the gallery and change.
            seen = set()
            deadline = time.monotonic() + 120
            while len(seen) < 2:
                for item in page.locator("#results .thumbnail-item").all():
                    label = item.locator(".caption-label")
                    text = label.inner_text() if label.count() else ""
                    src = item.locator("img").get_attribute("src") if item.locator("img").count() else None
                    if re.fullmatch(r"sample \d: step \d+ of \d+ \(preview\)", text) and src:
                        seen.add((text, src))
                assert time.monotonic() < deadline, seen
                page.wait_for_timeout(200)
            assert len({src for _, src in seen}) >= 2
            wait_status(page, r"2 of 6 samples done")
            page.reload(wait_until="domcontentloaded")
            page.wait_for_selector("#photo canvas", timeout=60_000)
            deadline = time.monotonic() + 120
            while True:
                page.locator("#history input").click()  # its list is refreshed as it opens
                page.wait_for_timeout(700)
                ended = page.get_by_role("option", name=re.compile(r"'a cup of tea', seed 404, \d results"))
                if ended.count():
                    ended.first.click()
                    break
                assert time.monotonic() < deadline, [o.inner_text() for o in page.get_by_role("option").all()]
                page.keyboard.press("Escape")
                page.locator("#results-help").click()  # away from the list: the next click focuses it again
                page.wait_for_timeout(1000)
            status = wait_status(page, r"^(reopened|error)")
            finished = re.match(r"reopened run_\d{4}: cancelled after ([246]) of 6 samples; \1 results ranked", status)
            assert finished, status
            assert len(captions(page)) == int(finished.group(1))
            assert page.locator("#prompt textarea").input_value() == "a cup of tea"
            assert len(page.locator("#mask-upload img").all()) == 1  # the mask used, ready to run again
        finally:
            browser.close()
    assert "Traceback" not in server.log, server.log[-3000:]


def test_paint_edit_and_recover_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            earlier = set(os.listdir(server.out))
            page = open_page(browser, server.url)
            paint(page, upload_photo(page))
            run_edit(page, "a cup of green tea", 2)
            status = wait_status(page, r"results ranked|error")
            assert status.startswith("2 results ranked"), status
            assert smoke.LABEL in status
            shown = captions(page)
            assert len(shown) == 2 and len(page.locator("#results img").all()) == 2, shown
            scored = r"whole \d+\.\d{3} psnr \d+ bg \d+\.\d{3} seam \d+\.\d{2}"  # the scores, short
            distances = [float(re.match(rf"#(\d) d=(\d+\.\d{{4}}) seed 404 sample \d {scored} \(smoke\)$", c).group(2))
                         for c in shown]
            assert [c[:2] for c in shown] == ["#0", "#1"] and distances == sorted(distances)
            # The score table: a row per result, best first; sorted by a column from its header's menu.
            rows = score_rows(page)
            assert [row[0] for row in rows] == [0, 1] and [row[3] for row in rows] == pytest.approx(distances, abs=1e-4)
            page.locator('#scores [data-testid="header-7"]').hover()  # seam
            page.locator('#scores [data-testid="header-7"] button[aria-label="Open cell menu"]').click()
            seams = [row[7] for row in rows]
            descending = seams != sorted(seams, reverse=True)  # the order the table is not in yet
            page.get_by_role("menuitem", name="Sort descending" if descending else "Sort ascending").click()
            want = sorted(seams, reverse=descending)
            for _ in range(50):  # the table re-renders sorted within a frame or two
                by_seam = score_rows(page)
                if [row[7] for row in by_seam] == want:
                    break
                page.wait_for_timeout(100)
            assert [row[7] for row in by_seam] == want, by_seam
            assert sorted(map(tuple, by_seam)) == sorted(map(tuple, rows))

            # The window and its scale are stated, the run's inputs shown: the photo with the
            # window drawn, and the mask used at the photo's size.
            assert re.search(r"editing a \d+x\d+ window at \(-?\d+, -?\d+\) of the 480x320 photo at 64 px", status)
            assert fetch_png(page, "#source-used").shape == (320, 480)
            # The mask used, at the photo's size: the stroke is in it, and nothing far from it.
            mask = fetch_png(page, "#mask-used") > 0
            assert mask.shape == (320, 480)
            check_mask_near(mask, STROKE, 60)  # photo pixels: the brush's radius and a margin

            # A large photo (1600 x 900, shown zoomed out): the results come back at its size,
            # unchanged far from the stroke; the best one downloaded from the page.
            big = tmp_path / "big.png"
            with Image.open(COFFEE) as photo:
                photo.convert("RGB").resize(BIG, Image.LANCZOS).save(big)
            uploaded = np.asarray(Image.open(big).convert("RGB"))
            page = open_page(browser, server.url)
            paint(page, upload_photo(page, big), BIG_STROKE, steps=5)  # fewer redraws of the large canvas
            run_edit(page, "a cup of green tea", 2)
            status = wait_status(page, r"results ranked|error")
            assert status.startswith("2 results ranked"), status
            assert re.search(r"editing a (\d+)x\1 window at \(-?\d+, -?\d+\) of the 1600x900 photo at 64 px, "
                             r"upscaled \d+\.\dx back \(context 0\.5, feather 4\)", status), status
            assert "note: the edit window spans" in status  # a 64-pixel model for a window of hundreds
            files = downloads(page)
            ranked = [name for name in files if re.fullmatch(r"\d{3}_\d+\.\d{4}\.png", name)]
            assert len(ranked) == 2 and ranked[0].startswith("000_"), files
            assert {"results.zip", "source.png", "mask.png", "grid.png", "report.json"} <= set(files), files
            best = fetch(page, files[ranked[0]])
            assert best.shape == (900, 1600, 3)
            np.testing.assert_array_equal(fetch(page, files["source.png"]), uploaded)
            mask = fetch(page, files["mask.png"], "L") > 0
            assert mask.shape == (900, 1600)
            check_mask_near(mask, BIG_STROKE, 60 * BIG[0] / 480)
            # Farther than the feather (4 pixels) from the mask, every pixel is the uploaded photo's;
            # inside, the edit.
            ys, xs = np.nonzero(mask)
            near = np.zeros_like(mask)
            near[max(ys.min() - 6, 0):ys.max() + 7, max(xs.min() - 6, 0):xs.max() + 7] = True
            np.testing.assert_array_equal(best[~near], uploaded[~near])
            assert (best[mask] != uploaded[mask]).any(axis=-1).mean() > 0.5
            shown = fetch_png(page, "#results")  # the gallery's images: the results at full size
            assert shown.shape == (900, 1600)
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            if os.environ.get("BDJAX_APP_SCREENSHOT"):
                shutil.copyfile(tmp_path / "app.png", os.environ["BDJAX_APP_SCREENSHOT"])

            # An empty mask: one line in the page, and the server stays up.
            page = open_page(browser, server.url)
            upload_photo(page)
            run_edit(page, "a cup of green tea", 2)
            status = wait_status(page, r"error")
            assert status == "error: the mask is empty: paint over the region to change with the brush, or " \
                             "upload a mask file", status
            assert "Traceback" not in server.log

            # A further request is served, and another user's request waits in the queue with its
            # position shown. Cancelled while its second batch (of three) runs, the first stops
            # after that batch and ranks what it finished; the queued one then runs in full.
            paint(page, upload_photo(page))
            other = open_page(browser, server.url)
            paint(other, upload_photo(other))
            other.locator("#advanced").click()  # an option the app has not compiled for
            other.locator("#option-aug_num input").fill("3")
            other.locator("#option-context input").fill("0.25")  # the framing: no new compile
            other.locator("#option-feather input").fill("0")
            record_status(other)
            run_edit(page, "a cup of green tea", 6)
            wait_status(page, r"sampling 6 samples")
            run_edit(other, "a cup of coffee", 2)
            wait_status(other, r"queue: 1/1")
            wait_status(page, r"2 of 6 samples done")
            page.locator("#cancel").click()
            status = wait_status(page, r"results ranked|error")
            finished = re.match(r"cancelled after ([24]) of 6 samples; \1 results ranked", status)
            assert finished, status
            assert len(captions(page)) == int(finished.group(1))
            assert wait_status(other, r"results ranked|error").startswith("2 results ranked")
            # Its new configuration was prepared (compiled) first, and the page said so.
            assert any("preparing the sampler" in text for text in other.evaluate("window.statusLog"))
        finally:
            browser.close()

    assert server.stop() == 0, server.log[-3000:]
    assert "Traceback" not in server.log, server.log[-3000:]
    # Everything it wrote is in --output_dir: one folder per run that sampled, nothing in HOME or
    # in the directory it ran in.
    runs = sorted(set(os.listdir(server.out)) - earlier)
    assert len(runs) == 4 and all(re.fullmatch(r"run_\d{4}", run) for run in runs), runs
    big_run, other_run = server.out / runs[1], server.out / runs[3]
    for name in ("grid.png", "report.json", "source.png", "mask.png", "window.png", "source_model.png",
                 "mask_model.png"):
        assert (big_run / name).is_file()
    with Image.open(big_run / "ranked" / os.listdir(big_run / "ranked")[0]) as im:
        assert im.size == BIG and im.mode == "RGB"
    report = json.loads((big_run / "report.json").read_text())
    assert report["fit"] == "window" and report["window"]["photo_size"] == list(BIG)
    report = json.loads((other_run / "report.json").read_text())  # the other user's
    assert (report["options"]["aug_num"], report["context"], report["feather"]) == (3, 0.25, 0)
    assert os.listdir(server.workdir) == []
    assert [os.path.join(d, f) for d, _, fs in os.walk(server.home) for f in fs] == []

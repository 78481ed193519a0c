"""Captions of labeled images stay legible where a person first sees them: TensorBoard's default image card.

TensorBoard 2.21 fits an image into a 375 x 215 CSS-pixel box in each image card of its TIME SERIES dashboard
(the one it opens on) and shows it 350 wide in its IMAGES dashboard; mlfab.logs.media.CARD_SIZE is the smaller
of both, (350, 215). The unit tests measure the caption ink in the logged image scaled to that box; the slow test
renders the card in a headless Chromium and measures the screenshot.
"""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlfab.logs.media import CARD_SIZE, make_image, make_images

MIN_INK_PX = 8  # Height of a caption line's ink ("ytrue=3, ypred=3": ascenders to descenders) as displayed.


def _digits(count: int) -> tuple[np.ndarray, list[str]]:
    """`count` 8x8 gray digits (as examples/digits.py logs them) and its caption for each."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, 8, 8), dtype=np.uint8)
    labels = [f"ytrue={i % 10}, ypred={(i * 7) % 10}" for i in range(count)]
    return images, labels


def _ink_rows(strip: np.ndarray) -> list[tuple[int, int]]:
    """(first, end) of each run of rows holding dark pixels, top to bottom."""
    dark = (strip.min(axis=-1) < 128).any(axis=1)
    runs, start = [], None
    for y, d in enumerate([*dark, False]):
        if d and start is None:
            start = y
        elif not d and start is not None:
            runs.append((start, y))
            start = None
    return runs


def _first_caption_line_px(grid: np.ndarray, image_px: int = 256) -> int:
    """Ink height of the first caption line under the top-left image (which is `image_px` tall)."""
    cell_w = next(x for x in range(grid.shape[1]) if (grid[:, x] == 0).all())  # The first black separator column.
    strip = grid[image_px:, :cell_w]
    strip = strip[: next((y for y in range(len(strip)) if (strip[y] == 0).all()), len(strip))]  # Down to the gap.
    return _ink_rows(strip)[0][1] - _ink_rows(strip)[0][0]


def _card_scale(image: np.ndarray) -> float:
    return min(CARD_SIZE[0] / image.shape[1], CARD_SIZE[1] / image.shape[0])


@pytest.mark.unit
@pytest.mark.parametrize("count", [4, 7, 16])
def test_labeled_grid_captions_are_legible_in_the_card(count: int) -> None:
    images, labels = _digits(count)
    grid = make_images(images, "images", labels=labels, max_images=16)
    shown = _first_caption_line_px(grid) * _card_scale(grid)
    assert shown >= MIN_INK_PX, f"{count} captions: {grid.shape[1]}x{grid.shape[0]} grid, text {shown:.1f} px in card"


@pytest.mark.unit
def test_single_labeled_image_caption_is_legible_in_the_card() -> None:
    image = make_image(np.zeros((8, 8), dtype=np.uint8), "one", label="ytrue=3, ypred=3")
    strip = image[256:]
    first, end = _ink_rows(strip)[0]
    assert (end - first) * _card_scale(image) >= MIN_INK_PX


@pytest.mark.unit
def test_small_grid_keeps_small_captions() -> None:
    """A grid the card shows near its own size needs no bigger text: captions stay at Pillow's default size."""
    _, labels = _digits(2)
    grid = make_images(np.zeros((2, 100, 100), dtype=np.uint8), "images", labels=labels, keep_resolution=True)
    assert grid.shape[1] == 2 * 100 + 2  # Side by side, shown at about its own size.
    assert _first_caption_line_px(grid, image_px=100) <= 12  # Pillow's default 10 px font.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chromium() -> str | None:
    return next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs a Chromium (e.g. `apt-get install chromium`)")
def test_digits_captions_in_tensorboard_time_series_card(tmp_path: Path) -> None:
    """The digits example's captioned grid in TensorBoard's TIME SERIES image card, rendered by Chromium at one
    device pixel per CSS pixel: the image fits the card's box and its captions are at least MIN_INK_PX tall."""
    from examples.digits import Config, DigitsClassification
    from mlfab.testing import read_images

    DigitsClassification.launch(Config(max_steps=1, valid_every_n_steps=1, run_dir=str(tmp_path / "runs")), argv=[])
    (exp,) = (tmp_path / "runs" / "digits_classification").iterdir()
    (_, grid), *_ = read_images(exp / "tensorboard" / "valid")["value/images"]

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(exp), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, ready = time.monotonic() + 120, False
        while not ready and time.monotonic() < deadline:
            try:
                tags = json.loads(urllib.request.urlopen(f"{base}/data/plugin/images/tags", timeout=5).read())
                ready = any("value/images" in by_tag for by_tag in tags.values())
            except OSError:
                pass
            time.sleep(0.5)
        assert ready, "TensorBoard did not list the image within 120 s"
        # The grid as the TIME SERIES card should show it: fitted into its 375 x 215 box.
        scale = min(375 / grid.shape[1], 215 / grid.shape[0])
        size = (round(grid.shape[1] * scale), round(grid.shape[0] * scale))
        expected = np.asarray(Image.fromarray(grid).resize(size, Image.Resampling.BOX)).astype(np.int16)
        url = f"{base}/?tagFilter={urllib.parse.quote('value/images')}#timeseries"
        found = None
        # The card stays empty until TensorBoard's time-series data has the image, some seconds (of real time, not
        # the page's virtual time) after the tags list it: on a busy machine the first several screenshots show an
        # empty card (CI saw 5 in a row). Try again for up to about 2 minutes.
        for attempt in range(12):
            shot = tmp_path / f"card{attempt}.png"
            _screenshot(url, shot, budget_ms=20000 * (min(attempt, 2) + 1))
            page = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
            found = _locate(page, expected)
            if found is not None:
                break
            time.sleep(5)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert found is not None, "the image card did not show the grid at the size the card's box gives"
    y, x = found
    shown = page[y : y + size[1], x : x + size[0]]

    # The caption strip under the top-left image, as rendered: the first caption line's ink height. Cells are as
    # wide as their images (the 8 x 8 digits, resized to 256 x 256) and adjacent (log_labeled_images' sep=0, 0.2's
    # default); the strip ends where the next row's digit starts (its black border under the strip's white margin).
    cell_w = 256
    top = round(256 * scale)
    bottom = next((r for r in range(256, grid.shape[0]) if (grid[r, :2] != 255).any()), grid.shape[0])
    strip = shown[top : round(bottom * scale), : round(cell_w * scale)]
    ink = [row for row in range(len(strip)) if (strip[row].min(axis=-1) < 150).any()]
    assert ink, "no caption text in the rendered card"
    run_end = next((a for a, b in zip(ink, ink[1:], strict=False) if b != a + 1), ink[-1])
    assert run_end - ink[0] + 1 >= MIN_INK_PX


def _screenshot(url: str, path: Path, budget_ms: int = 20000) -> None:
    """A 1400 x 1000 screenshot of `url` by headless Chromium, one device pixel per CSS pixel."""
    subprocess.run(
        [
            str(_chromium()),
            "--headless=new",
            "--no-sandbox",  # Needed as root (CI); the page is a local TensorBoard.
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            "--window-size=1400,1000",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )


def _locate(page: np.ndarray, expected: np.ndarray) -> tuple[int, int] | None:
    """Top-left (y, x) where `expected` appears in `page` (mean absolute difference under 24 of 255), or None."""
    h, w = expected.shape[:2]
    gray_page, gray_exp = page.mean(axis=-1), expected.mean(axis=-1)
    best: tuple[float, int, int] | None = None
    # The card sits right of the runs sidebar; scan with a coarse then a fine step.
    for y in range(0, gray_page.shape[0] - h, 4):
        for x in range(0, gray_page.shape[1] - w, 4):
            diff = float(np.abs(gray_page[y : y + h : 4, x : x + w : 4] - gray_exp[::4, ::4]).mean())
            if best is None or diff < best[0]:
                best = (diff, y, x)
    assert best is not None
    _, y0, x0 = best
    fine = [
        (float(np.abs(gray_page[y : y + h, x : x + w] - gray_exp).mean()), y, x)
        for y in range(max(0, y0 - 4), min(gray_page.shape[0] - h, y0 + 5))
        for x in range(max(0, x0 - 4), min(gray_page.shape[1] - w, x0 + 5))
    ]
    diff, y, x = min(fine)
    return (y, x) if diff < 24 else None

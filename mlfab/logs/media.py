"""Turn values a user logs (tensors, arrays, PIL images) into arrays a logger can display.

Pure functions, called lazily when a logger writes, so they favour correct output and errors that name the logging
key over speed. Outputs may share memory with inputs when no conversion is needed; inputs are never written to.
Images come out as uint8 HWC RGB, videos as uint8 THWC RGB, audio as float32 in [-1, 1].
"""

import io
import math
from collections.abc import Callable
from functools import cache, lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

DEFAULT_AREA = 256 * 256
# Where a person first sees a logged image: TensorBoard's TIME SERIES dashboard (the one it opens on) fits it into
# a 375 x 215 box (CSS pixels) in each image card, its IMAGES dashboard shows it 350 wide (TensorBoard 2.21,
# measured in Chromium). Captions are sized for the stricter of both: the image fitted into 350 x 215.
CARD_SIZE = (350, 215)
MIN_CAPTION_PX = 11  # Caption font size (em) there, at least: digits about 8 px tall.
BASE_FONT_PX = 10  # Pillow's default font size: captions of an image shown at its own size or larger.
_MIN_LINE_EMS = 4  # The font grows at most to a quarter of the image width (about eight characters on a line).
_CHANNELS = (1, 3, 4)
_MAX_AUDIO_CHANNELS = 8
_PAD = 2  # pixels around caption text (more for larger text)
# Stops of a dark-to-bright (inferno-like) gradient; luminance rises monotonically, so brighter always means louder.
_CMAP_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_CMAP_COLORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def to_numpy(value) -> np.ndarray:
    """A numpy array for a tensor (any device or dtype), PIL image or array-like, without copying when possible."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        tensor = tensor.float() if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
        return tensor.cpu().resolve_conj().resolve_neg().numpy()
    if isinstance(value, Image.Image) and value.mode not in ("1", "L", "RGB", "RGBA"):
        value = value.convert("RGBA")  # palette, 16-bit, CMYK, ...: let Pillow map them to 8-bit
    return np.asarray(value)


def _to_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    """Pixels as uint8: floats are read as [0, 1] and clipped (NaN -> 0), bools as 0/255, other ints clipped."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return np.where(arr, np.uint8(255), np.uint8(0))
    if np.issubdtype(arr.dtype, np.integer):
        return np.clip(arr, 0, min(255, np.iinfo(arr.dtype).max)).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        out = np.nan_to_num(arr.astype(np.float32), copy=False, nan=0.0)
        return np.rint(np.clip(out, 0.0, 1.0, out=out) * 255.0).astype(np.uint8)
    raise ValueError(f"{where}: cannot turn values of dtype {arr.dtype} into pixels")


def _channels_to_rgb(arr: np.ndarray, where: str) -> np.ndarray:
    """Make the last axis RGB: gray is repeated, alpha is dropped (not composited); alpha is never converted."""
    channels = arr.shape[-1]
    rgb = _to_uint8(arr[..., :3] if channels == 4 else arr, where)
    return np.ascontiguousarray(np.repeat(rgb, 3, axis=-1) if channels == 1 else rgb)


def _image_to_rgb(arr: np.ndarray, where: str) -> np.ndarray:
    """Infer HW / HWC / CHW (HWC wins when both ends could be channels) and return uint8 HWC RGB."""
    shape = tuple(arr.shape)
    if arr.ndim == 2:
        hwc = arr[:, :, None]
    elif arr.ndim == 3 and shape[-1] in _CHANNELS:
        hwc = arr
    elif arr.ndim == 3 and shape[0] in _CHANNELS:
        hwc = arr.transpose(1, 2, 0)
    else:
        raise ValueError(f"{where}: cannot read an image of shape {shape}; expected HW, CHW or HWC (C in 1, 3, 4)")
    if hwc.shape[0] == 0 or hwc.shape[1] == 0:
        raise ValueError(f"{where}: image of shape {shape} is empty")
    return _channels_to_rgb(hwc, where)


def normalize_image(value, key: str) -> np.ndarray:
    """One image (HW, CHW or HWC; floats read as [0, 1] and clipped) as uint8 HWC RGB, alpha dropped."""
    return _image_to_rgb(to_numpy(value), f"log_image({key!r})")


def _split(value, where: str) -> list[np.ndarray]:
    """Split a batch; BCHW items come back as HWC views so the later per-image layout guess cannot misread them."""
    if isinstance(value, (list, tuple)):
        return [to_numpy(item) for item in value]
    arr = to_numpy(value)
    if arr.ndim == 3:
        return list(arr)
    if arr.ndim == 4 and arr.shape[1] in _CHANNELS:
        return list(arr.transpose(0, 2, 3, 1))
    if arr.ndim == 4 and arr.shape[-1] in _CHANNELS:
        return list(arr)
    raise ValueError(
        f"{where}: cannot read a batch of images of shape {tuple(arr.shape)}; "
        "expected BHW, BCHW or BHWC (C in 1, 3, 4), or a list of images"
    )


def split_batch(value, key: str) -> list[np.ndarray]:
    """Single images (not yet normalized) of a BHW / BCHW / BHWC batch (BCHW wins when ambiguous) or a list."""
    return _split(value, f"log_images({key!r})")


def resize_to_area(img: np.ndarray, target_area: int = DEFAULT_AREA, keep_resolution: bool = False) -> np.ndarray:
    """Scale uint8 HWC RGB to about target_area pixels, keeping aspect, so tiny and huge images show alike.

    Upscaling uses NEAREST so small images (digits, 8x8 grids) stay crisp; downscaling uses BOX (area average).
    """
    if keep_resolution:
        return img
    if target_area < 1:
        raise ValueError(f"target_area must be positive, got {target_area}")
    height, width = img.shape[:2]
    short, long = sorted((height, width))
    new_short = max(1, round(short * math.sqrt(target_area / (height * width))))
    new_long = max(1, round(new_short * long / short))  # from the rounded short side: aspect kept within 1 pixel
    size = (new_long, new_short) if width >= height else (new_short, new_long)
    if size == (width, height):
        return img
    resample = Image.Resampling.NEAREST if new_short > short else Image.Resampling.BOX
    return np.asarray(Image.fromarray(img).resize(size, resample))


@lru_cache(maxsize=64)
def _font(size: int = BASE_FONT_PX) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size` px (without FreeType, its bitmap font, whose size is fixed)."""
    return ImageFont.load_default(size)


def _pad(font_size: int) -> int:
    return max(_PAD, font_size // 8)


@lru_cache(maxsize=64)
def _ink_box(font_size: int) -> tuple[int, int]:
    """Top and bottom of the ink of a line of text drawn at y = 0 (ascenders to descenders)."""
    box = _font(font_size).getbbox("Agy|")
    return int(box[1]), int(box[3])


def _line_height(font_size: int) -> int:
    top, bottom = _ink_box(font_size)
    return bottom - top + _pad(font_size)


@lru_cache(maxsize=4096)
def _text_width(text: str, font_size: int) -> float:
    return _font(font_size).getlength(text)  # ~0.1 ms at large sizes, and captions repeat words and lines


@lru_cache(maxsize=1024)
def _wrap(caption: str, width_px: int, max_line_chars: int | None, font_size: int = BASE_FONT_PX) -> tuple[str, ...]:
    """Greedy word wrap to a pixel width; words wider than a line are broken; explicit newlines are kept."""

    def fits(text: str) -> bool:
        return _text_width(text, font_size) <= width_px and (max_line_chars is None or len(text) <= max_line_chars)

    lines: list[str] = []
    for paragraph in caption.splitlines():
        line = ""
        for word in paragraph.split():
            if fits(f"{line} {word}" if line else word):
                line = f"{line} {word}" if line else word
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and not fits(word):
                cut = 1
                while cut < len(word) - 1 and fits(word[: cut + 1]):
                    cut += 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return tuple(lines)


def caption_rows(img_width: int, caption: str, max_line_chars: int | None = None, font_size: int = BASE_FONT_PX) -> int:
    """Text rows `caption` needs under an image this wide, so a batch can give every caption the same strip."""
    return len(_wrap(caption, img_width - 2 * _pad(font_size), max_line_chars, font_size))


def caption_height(rows: int, font_size: int = BASE_FONT_PX) -> int:
    """Pixel height of a caption strip of `rows` text rows (0 for none)."""
    return rows * _line_height(font_size) + 2 * _pad(font_size) if rows else 0


def add_caption(
    img: np.ndarray,
    caption: str,
    rows: int | None = None,
    max_line_chars: int | None = None,
    font_size: int = BASE_FONT_PX,
) -> np.ndarray:
    """Append a white strip with the caption wrapped in black text below uint8 HWC RGB; `rows` fixes its height.

    Text needing more than `rows` rows is cut and ends in "..."; an empty caption (0 rows) adds nothing.
    """
    width, pad = img.shape[1], _pad(font_size)
    lines = list(_wrap(caption, width - 2 * pad, max_line_chars, font_size))
    rows = len(lines) if rows is None else rows
    if 0 < rows < len(lines):
        lines = lines[:rows]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    if rows == 0:
        return img
    strip = Image.new("RGB", (width, caption_height(rows, font_size)), "white")
    draw = ImageDraw.Draw(strip)
    top = _ink_box(font_size)[0]
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * _line_height(font_size) - top), line, fill=(0, 0, 0), font=_font(font_size))
    return np.concatenate([img, np.asarray(strip)], axis=0)


def card_scale(width: int, height: int) -> float:
    """How TensorBoard's default views scale an image this large: to fit CARD_SIZE (below 1: shrunk)."""
    return min(CARD_SIZE[0] / width, CARD_SIZE[1] / height)


def _grid_size(count: int, cols: int, cell_w: int, cell_h: int, sep: int) -> tuple[int, int]:
    rows = math.ceil(count / cols)
    return cols * (cell_w + sep) - sep, rows * (cell_h + sep) - sep


def _card_columns(count: int, cell_w: int, cell_h: int, sep: int) -> int:
    """The number of columns that shows a grid of `count` cells largest in CARD_SIZE (the fewest, when tied)."""
    return max(range(1, count + 1), key=lambda cols: (card_scale(*_grid_size(count, cols, cell_w, cell_h, sep)), -cols))


def _words_fit(images: list[np.ndarray], labels: list[str], font_size: int) -> bool:
    """Whether every word of every caption fits on a line under its image (no word is broken) at this size."""
    return all(
        _text_width(word, font_size) <= img.shape[1] - 2 * _pad(font_size)
        for img, label in zip(images, labels, strict=True)
        for word in label.split()
    )


def caption_layout(images: list[np.ndarray], labels: list[str], sep: int = 2) -> tuple[int, int, int]:
    """(font size, caption rows, grid columns) for images captioned with `labels`, tiled with `sep`.

    The smallest font from BASE_FONT_PX up whose text is at least MIN_CAPTION_PX once the tiled image is fitted
    into CARD_SIZE, in as many columns as show the grid largest there; every caption gets the rows the longest
    needs. The font grows at most to a quarter of the image width, and only while no word has to be broken
    across lines; where that is not enough (many images, long captions) it takes, of a few of those sizes, the
    one whose text the card shows largest, and the captions are read at full size (the card's expand button, or
    its "show actual image size").
    """
    cell_w = max(img.shape[1] for img in images)
    image_h = max(img.shape[0] for img in images)

    @cache
    def layout(size: int) -> tuple[int, int, int, float]:
        rows = max(caption_rows(img.shape[1], label, font_size=size) for img, label in zip(images, labels, strict=True))
        cell_h = image_h + caption_height(rows, size)
        cols = _card_columns(len(images), cell_w, cell_h, sep)
        return size, rows, cols, size * card_scale(*_grid_size(len(images), cols, cell_w, cell_h, sep))

    def legible(size: int) -> bool:
        return layout(size)[3] >= MIN_CAPTION_PX

    def unbroken(size: int) -> bool:
        return _words_fit(images, labels, size)

    smallest = BASE_FONT_PX
    if legible(smallest) or not unbroken(smallest) or not any(label.strip() for label in labels):
        return layout(smallest)[:3]
    largest = _last_true(unbroken, smallest, max(smallest, cell_w // _MIN_LINE_EMS))
    if not legible(largest):  # Not legible at any allowed size: of a few of them, the one shown largest.
        sizes = {smallest + (largest - smallest) * k // 4 for k in range(5)}
        return max((layout(size) for size in sorted(sizes)), key=lambda lay: lay[3])[:3]
    return layout(_first_true(legible, smallest, largest))[:3]


def _last_true(holds: Callable[[int], bool], low: int, high: int) -> int:
    """The largest n in [low, high] for which `holds` (true at `low`, and false from some n on) is true."""
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if holds(mid) else (low, mid - 1)
    return low


def _first_true(holds: Callable[[int], bool], low: int, high: int) -> int:
    """The smallest n in [low, high] for which `holds` (true at `high`, and mostly from some n on) is true."""
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if holds(mid) else (mid + 1, high)
    return low


def tile_images(
    images: list[np.ndarray], sep: int = 2, max_images: int | None = None, cols: int | None = None
) -> np.ndarray:
    """Grid of uint8 HWC images with `sep` black pixels between cells, in `cols` columns (default: near-square).

    Cells are as large as the largest image; smaller images sit at the top-left of their cell, padded with black.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    images = images[:max_images]
    if not images:
        raise ValueError("tile_images: no images to tile")
    cols = min(cols, len(images)) if cols is not None else math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_h, cell_w = max(img.shape[0] for img in images), max(img.shape[1] for img in images)
    grid = np.zeros((rows * (cell_h + sep) - sep, cols * (cell_w + sep) - sep, images[0].shape[2]), dtype=np.uint8)
    for i, img in enumerate(images):
        y, x = (i // cols) * (cell_h + sep), (i % cols) * (cell_w + sep)
        grid[y : y + img.shape[0], x : x + img.shape[1]] = img
    return grid


def make_image(value, key: str, *, label: str | None = None, keep_resolution: bool = False) -> np.ndarray:
    """One logged image, ready to display: normalized to uint8 HWC RGB, resized to about DEFAULT_AREA pixels and,
    with a `label`, captioned in a strip under the image (legible in TensorBoard's card: `caption_layout`)."""
    image = resize_to_area(normalize_image(value, key), keep_resolution=keep_resolution)
    if label is None:
        return image
    font_size, rows, _ = caption_layout([image], [label])
    return add_caption(image, label, rows=rows, font_size=font_size)


def make_images(
    value,
    key: str,
    *,
    labels: list[str] | None = None,
    max_images: int | None = None,
    sep: int = 2,
    keep_resolution: bool = False,
) -> np.ndarray:
    """A batch of images as one grid: split, normalize and resize each, then tile.

    With `labels` (one per image), each image is captioned, and every caption gets as many rows as the longest
    needs, so grid cells line up; the font size and the number of columns are chosen so that the captions can be
    read where TensorBoard first shows the grid (`caption_layout`). Without labels the grid is near-square. The
    batch is cut to `max_images` before converting: dropped images cost nothing.
    """
    where = f"log_images({key!r})" if labels is None else f"log_labeled_images({key!r})"
    raw = _split(value, where)
    if labels is not None and len(labels) != len(raw):
        raise ValueError(f"{where}: got {len(raw)} images but {len(labels)} labels")
    if not raw or (max_images is not None and max_images < 1):
        raise ValueError(f"{where}: nothing to show ({len(raw)} images, max_images={max_images})")
    images = [
        resize_to_area(_image_to_rgb(img, f"{where} image {i}"), keep_resolution=keep_resolution)
        for i, img in enumerate(raw[:max_images])
    ]
    if labels is None:
        return tile_images(images, sep)
    labels = labels[: len(images)]  # max_images may have cut the batch
    font_size, rows, cols = caption_layout(images, labels, sep)
    captioned = [
        add_caption(img, label, rows=rows, font_size=font_size) for img, label in zip(images, labels, strict=True)
    ]
    return tile_images(captioned, sep, cols=cols)


def _audio_array(audio, where: str) -> np.ndarray:
    """Check the (T,) or (C, T) layout; C is capped so that a (T, C) array is reported rather than misread."""
    arr = to_numpy(audio)
    if arr.ndim == 1 or (arr.ndim == 2 and 1 <= arr.shape[0] <= _MAX_AUDIO_CHANNELS):
        return arr
    limit = _MAX_AUDIO_CHANNELS
    raise ValueError(
        f"{where}: cannot read audio of shape {tuple(arr.shape)}; expected (T,) or (C, T) with C <= {limit}"
    )


def _colormap(level: np.ndarray) -> np.ndarray:
    """Levels in [0, 1] as uint8 RGB along the gradient stops."""
    channels = [np.interp(level, _CMAP_STOPS, _CMAP_COLORS[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def make_spectrogram(audio, key: str, *, sample_rate: int, n_fft: int = 512, hop: int | None = None) -> np.ndarray:
    """A waveform's log-magnitude STFT (80 dB below its peak, silence black) as colored uint8 HWC RGB.

    Channels are averaged to mono; hop defaults to n_fft // 4. Columns are frames; row r from the top shows the
    frequency (n_fft // 2 - r) * sample_rate / n_fft, so low frequencies are at the bottom.
    """
    where = f"log_spectrogram({key!r})"
    arr = _audio_array(audio, where)
    if sample_rate <= 0 or n_fft < 2 or (hop is not None and hop < 1):
        raise ValueError(f"{where}: need sample_rate > 0, n_fft >= 2 and hop >= 1")
    wave = np.array(arr.mean(axis=0) if arr.ndim == 2 else arr, dtype=np.float32)
    np.nan_to_num(wave, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    window = torch.hann_window(n_fft)
    # Zero padding (not reflect) so clips shorter than n_fft work too.
    stft = torch.stft(
        torch.from_numpy(wave), n_fft, hop or n_fft // 4, window=window, pad_mode="constant", return_complex=True
    )
    magnitude = stft.abs().numpy()
    peak = float(magnitude.max())
    if peak <= 0.0:
        return _colormap(np.zeros_like(magnitude))
    level = 1.0 + np.log10(np.maximum(magnitude, peak * 1e-4) / peak) / 4.0  # 20 * log10(ratio) / 80 dB
    return _colormap(level[::-1])


def normalize_audio(audio, key: str) -> np.ndarray:
    """Audio as float32 clipped to [-1, 1]: (T,) stays (T,), (C, T) becomes (T, C) as audio writers expect.

    Signed integer PCM is scaled by its full range (int16 / 32768); NaN becomes silence.
    """
    where = f"log_audio({key!r})"
    arr = _audio_array(audio, where)
    if np.issubdtype(arr.dtype, np.signedinteger):
        out = arr.astype(np.float32) / np.float32(-np.iinfo(arr.dtype).min)
    elif np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
    else:
        raise ValueError(f"{where}: cannot read audio of dtype {arr.dtype}; expected float or signed integer samples")
    out = np.clip(np.nan_to_num(out, copy=False, nan=0.0), -1.0, 1.0, out=out)
    return np.ascontiguousarray(out.T) if out.ndim == 2 else out


def _resample_indices(num_frames: int, fps: float, target_fps: float) -> np.ndarray:
    """Source frame nearest in time to each output frame, keeping the clip's duration."""
    count = max(1, round(num_frames * target_fps / fps))
    return np.minimum(np.floor(np.arange(count) * fps / target_fps + 0.5).astype(np.int64), num_frames - 1)


def make_video(frames, key: str, *, fps: int, target_fps: int | None = None) -> np.ndarray:
    """Frames (TCHW, or THWC; TCHW wins when ambiguous; float [0, 1] or uint8) as uint8 THWC RGB, alpha dropped.

    With a target_fps different from fps, frames are picked by nearest timestamp.
    """
    where = f"log_video({key!r})"
    arr = to_numpy(frames)
    shape = tuple(arr.shape)
    if arr.ndim == 4 and shape[1] in _CHANNELS:
        thwc = arr.transpose(0, 2, 3, 1)
    elif arr.ndim == 4 and shape[-1] in _CHANNELS:
        thwc = arr
    else:
        raise ValueError(f"{where}: cannot read a video of shape {shape}; expected TCHW or THWC (C in 1, 3, 4)")
    if 0 in shape or fps <= 0 or (target_fps is not None and target_fps <= 0):
        raise ValueError(f"{where}: need a non-empty video and positive fps, got {shape} at {fps} -> {target_fps} fps")
    if target_fps is not None and target_fps != fps:
        thwc = thwc[_resample_indices(len(thwc), fps, target_fps)]  # select first so only kept frames are converted
    return _channels_to_rgb(thwc, where)


def subsample_points(
    points, key: str, *, max_points: int = 10_000, colors=None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Points as float32 (N, 3) ((B, N, 3) is flattened), optional colors as uint8, cut to max_points at random.

    Sampling is without replacement from a generator seeded with `seed` (reproducible) and keeps input order.
    Float colors are read as [0, 1].
    """
    where = f"log_point_cloud({key!r})"
    pts = to_numpy(points)
    shape = tuple(pts.shape)
    if pts.ndim not in (2, 3) or shape[-1] != 3 or max_points < 1:
        raise ValueError(f"{where}: cannot read points of shape {shape}; expected (N, 3) or (B, N, 3), max_points >= 1")
    cols = None if colors is None else to_numpy(colors)
    if cols is not None and tuple(cols.shape) != shape:
        raise ValueError(f"{where}: colors of shape {tuple(cols.shape)} do not match points of shape {shape}")
    pts, cols = pts.reshape(-1, 3), None if cols is None else cols.reshape(-1, 3)
    if len(pts) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(pts), size=max_points, replace=False))
        pts, cols = pts[keep], None if cols is None else cols[keep]
    return pts.astype(np.float32, copy=False), None if cols is None else _to_uint8(cols, where)


def gif_bytes(frames: np.ndarray, fps: int) -> bytes:
    """Animated GIF of uint8 (T, H, W, 3) frames. Written with Pillow because torch's `add_video` needs
    `moviepy.editor`, which moviepy 2 removed (it then silently writes nothing). GIF frame times are in 10 ms
    units and browsers play anything under 20 ms at 100 ms, so faster videos get 20 ms frames."""
    out = io.BytesIO()
    pictures = [Image.fromarray(f) for f in frames]
    pictures[0].save(
        out, format="GIF", save_all=True, append_images=pictures[1:], duration=max(int(1000 / max(fps, 1)), 20), loop=0
    )
    return out.getvalue()

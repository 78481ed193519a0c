"""Turn values a user logs (tensors, arrays, PIL images) into arrays a logger can display.

Pure functions, called lazily when a logger writes, so they favour correct output and errors that name the logging
key over speed. Outputs may share memory with inputs when no conversion is needed; inputs are never written to.
Images come out as uint8 HWC RGB, videos as uint8 THWC RGB, audio as float32 in [-1, 1].

Float pixels are normalised as mlfab 0.2 did (`float_range`): the range [min(lowest, 0), max(highest, 1)] of the
values maps to [0, 1], so an image already in [0, 1] is unchanged and a [-1, 1] image shows its full range. The
defaults of these building blocks (`sep=2`, left-aligned captions, ...) are not what users get: the `log_*`
methods (mlfab/logs/api.py) pass 0.2's defaults explicitly.
"""

import io
import logging
import math
import numbers
import wave
from bisect import bisect_left
from functools import cache, lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)
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
_STEREO = (1, 2)  # Channel counts 0.2 recognised on either side of a clip.
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
    # Float ("F") and 32/16-bit integer ("I", "I;16") images are read as their values, so they follow the same
    # float and integer rules as an array: Pillow's conversion would clip floats to 0..255 (a [0, 1] image black).
    as_values = ("1", "L", "RGB", "RGBA", "F", "I", "I;16", "I;16L", "I;16B", "I;16N")
    if isinstance(value, Image.Image) and value.mode not in as_values:
        value = value.convert("RGBA")  # palette, CMYK, ...: let Pillow map them to 8-bit
    return np.asarray(value)


ValueRange = tuple[float, float]


def float_range(*arrays: np.ndarray) -> ValueRange:
    """The float range that maps to black and white, over the finite values of all float `arrays` (mlfab 0.2's
    normalisation): [min(lowest, 0), max(highest, 1)]. Values already in [0, 1] keep their brightness; a [-1, 1]
    image or one in [0, 255] is stretched or squeezed into [0, 1] as a whole (never per channel)."""
    low, high = 0.0, 1.0
    for arr in arrays:
        if np.issubdtype(arr.dtype, np.floating) and arr.size:
            finite = arr[np.isfinite(arr)]
            if finite.size:
                low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    return low, high


_said: set[tuple[str, str]] = set()  # (call and key, what was said): each warning once per key.


def forget_warnings() -> None:
    """Each media warning is said once per key and run: each run's setup (fit, validate, ... in this process) says
    them again; building a task (`load_from_checkpoint` during a run, say) does not."""
    _said.clear()


def note_nonfinite(arr: np.ndarray, where: str, shown: str) -> None:
    """Values with NaN or infinities are written anyway, as `shown` says, with a warning once per call and key: a
    model's NaN output would otherwise look like a dark pixel or a pause."""
    if (where, "nonfinite") not in _said and not (finite := np.isfinite(arr)).all():
        _said.add((where, "nonfinite"))
        bad = arr.size - int(finite.sum())
        log.warning("%s: %d of %d values are NaN or infinite: %s (said once)", where, bad, arr.size, shown)


def _note_clipped(arr: np.ndarray, where: str) -> None:
    """Integer pixels outside [0, 255] (a 16-bit depth map, a label image with -1) are clipped: said once per key,
    or a 12-bit image would look like a white square with nothing said."""
    if (where, "clipped") in _said or not arr.size:
        return
    low, high = arr.min(), arr.max()
    if low < 0 or high > 255:
        _said.add((where, "clipped"))
        log.warning(
            "%s: integer values from %d to %d are clipped to [0, 255]; pass floats (or divide by the largest value) "
            "to see the whole range (said once)",
            where,
            low,
            high,
        )


def _to_uint8(arr: np.ndarray, where: str, value_range: ValueRange | None = None) -> np.ndarray:
    """Pixels as uint8: floats are mapped from `value_range` (default: `float_range(arr)`) to [0, 255] (NaN -> 0,
    +inf -> 255, -inf -> 0), bools to 0/255, other ints clipped to [0, 255]."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return np.where(arr, np.uint8(255), np.uint8(0))
    if np.issubdtype(arr.dtype, np.integer):
        _note_clipped(arr, where)
        return np.clip(arr, 0, min(255, np.iinfo(arr.dtype).max)).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        low, high = float_range(arr) if value_range is None else value_range
        note_nonfinite(arr, where, "drawn black (NaN, -inf) and white (+inf)")
        out = np.nan_to_num(arr.astype(np.float64), copy=False, nan=low, posinf=high, neginf=low)
        out = (out - low) / (high - low)
        return np.rint(np.clip(out, 0.0, 1.0, out=out) * 255.0).astype(np.uint8)
    raise ValueError(f"{where}: cannot turn values of dtype {arr.dtype} into pixels")


def _channels_to_rgb(arr: np.ndarray, where: str, value_range: ValueRange | None = None) -> np.ndarray:
    """Make the last axis RGB: gray is repeated, alpha is dropped (not composited); alpha is never converted."""
    channels = arr.shape[-1]
    rgb = _to_uint8(arr[..., :3] if channels == 4 else arr, where, value_range)
    return np.ascontiguousarray(np.repeat(rgb, 3, axis=-1) if channels == 1 else rgb)


def _image_to_rgb(arr: np.ndarray, where: str, value_range: ValueRange | None = None) -> np.ndarray:
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
    return _channels_to_rgb(hwc, where, value_range)


def normalize_image(value, key: str) -> np.ndarray:
    """One image (HW, CHW or HWC; floats normalised by `float_range`) as uint8 HWC RGB, alpha dropped."""
    return _image_to_rgb(to_numpy(value), f"log_image({key!r})")


def evenly_spaced(count: int, keep: int | None) -> list[int]:
    """Indices of `keep` of `count` items spread evenly from the first to the last, as mlfab 0.2 picked them
    (`linspace(0, count - 1, keep)` rounded half to even): 3 of 8 are 0, 4, 7; all of them when `keep` is None or
    at least `count`."""
    if keep is None or keep >= count:
        return list(range(count))
    if keep < 1:
        raise ValueError(f"need to keep at least one item, got {keep}")
    spots = torch.linspace(0, count - 1, keep, dtype=torch.float32).round().long().clamp(0, count - 1)
    return [int(i) for i in spots.tolist()]


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
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
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
def _wrap(caption: str, width_px: int, max_line_chars: int | None, font_size: int) -> tuple[str, ...]:
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
    centered: bool = False,
) -> np.ndarray:
    """Append a white strip with the caption wrapped in black text below uint8 HWC RGB; `rows` fixes its height.

    Text needing more than `rows` rows is cut and ends in "..."; an empty caption (0 rows) adds nothing. Lines are
    centered under the image with `centered`, else start at the left edge.
    """
    width, pad = img.shape[1], _pad(font_size)
    lines = list(_wrap(caption, width - 2 * pad, max_line_chars, font_size))
    rows = len(lines) if rows is None else rows
    if 0 < rows < len(lines):
        lines = lines[:rows]
        lines[-1] = lines[-1][:-3] + "..."
    if rows == 0:
        return img
    strip = Image.new("RGB", (width, caption_height(rows, font_size)), "white")
    draw = ImageDraw.Draw(strip)
    top = _ink_box(font_size)[0]
    for i, line in enumerate(lines):
        left = max(pad, round((width - _text_width(line, font_size)) / 2)) if centered else pad
        draw.text((left, pad + i * _line_height(font_size) - top), line, fill=(0, 0, 0), font=_font(font_size))
    return np.concatenate([img, np.asarray(strip)], axis=0)


def card_scale(width: int, height: int) -> float:
    """How TensorBoard's default views scale an image this large: to fit CARD_SIZE (below 1: shrunk)."""
    return min(CARD_SIZE[0] / width, CARD_SIZE[1] / height)


def _grid_size(count: int, cols: int, cell_w: int, cell_h: int, sep: int) -> tuple[int, int]:
    rows = math.ceil(count / cols)
    return cols * (cell_w + sep) - sep, rows * (cell_h + sep) - sep


def caption_layout(
    images: list[np.ndarray], labels: list[str], sep: int = 2, max_line_chars: int | None = None
) -> tuple[int, int, int]:
    """(font size, caption rows, grid columns) for images captioned with `labels`, tiled with `sep`; lines hold at
    most `max_line_chars` characters when given.

    The smallest font from BASE_FONT_PX up whose text is at least MIN_CAPTION_PX once the tiled image is fitted
    into CARD_SIZE, in as many columns as show the grid largest there; every caption gets the rows the longest
    needs. The font grows at most to a quarter of the image width, and only while no word has to be broken
    across lines; where that is not enough (many images, long captions) it takes, of a few of those sizes, the
    one whose text the card shows largest, and the captions are read at full size (the card's expand button, or
    its "show actual image size").
    """
    count = len(images)
    cell_w = max(img.shape[1] for img in images)
    image_h = max(img.shape[0] for img in images)
    captioned = list(zip(images, labels, strict=True))

    @cache
    def layout(size: int) -> tuple[int, int, int, float]:
        rows = max(caption_rows(img.shape[1], label, max_line_chars, font_size=size) for img, label in captioned)
        cell_h = image_h + caption_height(rows, size)
        scales = {cols: card_scale(*_grid_size(count, cols, cell_w, cell_h, sep)) for cols in range(1, count + 1)}
        cols = max(scales, key=lambda c: (scales[c], -c))  # The grid shown largest in the card; the fewest if tied.
        return size, rows, cols, size * scales[cols]

    def legible(size: int) -> bool:
        return layout(size)[3] >= MIN_CAPTION_PX

    def unbroken(size: int) -> bool:  # Every word of every caption fits on a line under its image.
        return all(
            _text_width(word, size) <= img.shape[1] - 2 * _pad(size)
            for img, label in captioned
            for word in label.split()
        )

    smallest = BASE_FONT_PX
    if legible(smallest) or not unbroken(smallest) or not any(label.strip() for label in labels):
        return layout(smallest)[:3]
    # Binary searches: the largest size whose words fit (true at `smallest`, false from some size on; searched from
    # the top down), then the smallest legible size up to it (true at `largest`, and mostly from some size on).
    top = max(smallest, cell_w // _MIN_LINE_EMS)
    largest = top - bisect_left(range(top, smallest, -1), True, key=unbroken)
    if not legible(largest):  # Not legible at any allowed size: of a few of them, the one shown largest.
        sizes = {smallest + (largest - smallest) * k // 4 for k in range(5)}
        return max((layout(size) for size in sorted(sizes)), key=lambda lay: lay[3])[:3]
    return layout(smallest + bisect_left(range(smallest, largest), True, key=legible))[:3]


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
    cell_h, cell_w = max(img.shape[0] for img in images), max(img.shape[1] for img in images)
    width, height = _grid_size(len(images), cols, cell_w, cell_h, sep)
    grid = np.zeros((height, width, images[0].shape[2]), dtype=np.uint8)
    for i, img in enumerate(images):
        y, x = (i // cols) * (cell_h + sep), (i % cols) * (cell_w + sep)
        grid[y : y + img.shape[0], x : x + img.shape[1]] = img
    return grid


def make_image(
    value,
    key: str,
    *,
    label: str | None = None,
    keep_resolution: bool = False,
    max_line_chars: int | None = None,
    centered: bool = False,
) -> np.ndarray:
    """One logged image, ready to display: normalized to uint8 HWC RGB, resized to about DEFAULT_AREA pixels and,
    with a `label`, captioned in a strip under the image (legible in TensorBoard's card: `caption_layout`)."""
    where = f"log_image({key!r})" if label is None else f"log_labeled_image({key!r})"
    image = resize_to_area(_image_to_rgb(to_numpy(value), where), keep_resolution=keep_resolution)
    if label is None:
        return image
    font_size, rows, _ = caption_layout([image], [label], max_line_chars=max_line_chars)
    return add_caption(image, label, rows=rows, max_line_chars=max_line_chars, font_size=font_size, centered=centered)


def make_images(
    value,
    key: str,
    *,
    labels: list[str] | None = None,
    max_images: int | None = None,
    sep: int = 2,
    keep_resolution: bool = False,
    max_line_chars: int | None = None,
    centered: bool = False,
) -> np.ndarray:
    """A batch of images as one grid: split, normalize and resize each, then tile.

    Float images share one `float_range`, that of the whole batch, so their brightness can be compared.
    `max_images` keeps that many images spread evenly over the batch (`evenly_spaced`), with their labels; dropped
    images are never converted. With `labels` (one per image), each image is captioned, and every caption gets as
    many rows as the longest needs, so grid cells line up; the font size and the number of columns are chosen so
    that the captions can be read where TensorBoard first shows the grid (`caption_layout`). Without labels the grid
    is near-square.
    """
    where = f"log_images({key!r})" if labels is None else f"log_labeled_images({key!r})"
    raw = _split(value, where)
    if labels is not None and len(labels) != len(raw):
        raise ValueError(f"{where}: got {len(raw)} images but {len(labels)} labels")
    if not raw or (max_images is not None and max_images < 1):
        raise ValueError(f"{where}: nothing to show ({len(raw)} images, max_images={max_images})")
    value_range = float_range(*raw)
    keep = evenly_spaced(len(raw), max_images)
    images = [
        resize_to_area(_image_to_rgb(raw[i], f"{where} image {i}", value_range), keep_resolution=keep_resolution)
        for i in keep
    ]
    if labels is None:
        return tile_images(images, sep)
    labels = [labels[i] for i in keep]
    font_size, rows, cols = caption_layout(images, labels, sep, max_line_chars)
    captioned = [
        add_caption(img, label, rows=rows, max_line_chars=max_line_chars, font_size=font_size, centered=centered)
        for img, label in zip(images, labels, strict=True)
    ]
    return tile_images(captioned, sep, cols=cols)


def audio_channels(audio, where: str) -> np.ndarray:
    """A clip as float32 (C, T): (T,) is mono; (C, T) with C in 1, 2 is read first (0.2's order), then (T, C) with
    C in 1, 2 (0.2's time-major layout), then (C, T) with C up to 8. Signed integer PCM is scaled by its full range
    (int16 / 32768); NaN and infinities become silence."""
    arr = to_numpy(audio)
    if arr.ndim == 2 and arr.shape[0] not in _STEREO and arr.shape[1] in _STEREO:
        arr = arr.T
    elif arr.ndim == 1:
        arr = arr[None]
    elif not (arr.ndim == 2 and 1 <= arr.shape[0] <= _MAX_AUDIO_CHANNELS):
        raise ValueError(
            f"{where}: cannot read audio of shape {tuple(arr.shape)}; expected (T,), (C, T) with C <= "
            f"{_MAX_AUDIO_CHANNELS}, or (T, C) with C in 1, 2"
        )
    if arr.shape[1] == 0:  # (An empty image is refused too.)
        raise ValueError(f"{where}: the clip has no samples (shape {tuple(to_numpy(audio).shape)})")
    if np.issubdtype(arr.dtype, np.signedinteger):
        out = arr.astype(np.float32) / np.float32(-np.iinfo(arr.dtype).min)
    elif np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
    else:
        raise ValueError(f"{where}: cannot read audio of dtype {arr.dtype}; expected float or signed integer samples")
    note_nonfinite(out, where, "played as silence")
    return np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def peak_normalize(clips: list[np.ndarray]) -> list[np.ndarray]:
    """0.2's audio normalisation: clips whose loudest sample exceeds 1 are all divided by that peak (one factor for
    the whole list, so their loudness can be compared); quieter audio is left as it is."""
    peak = max((float(np.abs(c).max()) for c in clips if c.size), default=0.0)
    return [c / np.float32(peak) for c in clips] if peak > 1.0 else clips


def _time_major(channels: np.ndarray) -> np.ndarray:
    """(C, T) as audio writers take it: (T,) for mono, (T, C) otherwise."""
    return channels[0] if len(channels) == 1 else np.ascontiguousarray(channels.T)


def normalize_audio(audio, key: str) -> np.ndarray:
    """One clip as float32 in [-1, 1] (`audio_channels`, then `peak_normalize`): (T,) for mono, (T, C) for C
    channels, as audio writers expect. Stereo stays stereo."""
    return _time_major(peak_normalize([audio_channels(audio, f"log_audio({key!r})")])[0])


def audio_batch(value, where: str) -> list[np.ndarray]:
    """The clips of a batch as float32 (C, T) each: (B, T), (B, C, T) with C in 1, 2, (B, T, C) with C in 1, 2,
    (B, C, T) with C up to 8, or a list of clips."""
    if isinstance(value, list | tuple):
        return [audio_channels(clip, where) for clip in value]
    arr = to_numpy(value)
    if arr.ndim not in (2, 3):  # A (T, C) clip is read time-major by `audio_channels`.
        expected = "expected (B, T), (B, C, T) or (B, T, C)"
        raise ValueError(f"{where}: cannot read a batch of audio of shape {tuple(arr.shape)}; {expected}")
    return [audio_channels(clip, where) for clip in arr]


def join_audio(clips: list[np.ndarray], sep_frames: int = 0) -> np.ndarray:
    """(C, T) clips played one after another with `sep_frames` samples of silence between them, time-major
    (`_time_major`); mono clips are repeated on every channel when others have more."""
    channels = max(len(c) for c in clips)
    gap = np.zeros((channels, max(sep_frames, 0)), dtype=np.float32)
    parts = [part for c in clips for part in (np.broadcast_to(c, (channels, c.shape[1])), gap)][:-1]
    return _time_major(np.concatenate(parts, axis=1).astype(np.float32, copy=False))


def stft_frames(milliseconds: float, sample_rate: int) -> int:
    """A duration as a power of two of samples (nearest on a log scale), as 0.2 sized its STFT: 32 ms at 44.1 kHz
    is 1024 samples, at 16 kHz 512."""
    if milliseconds <= 0 or sample_rate <= 0:
        raise ValueError(f"need a positive duration and sample rate, got {milliseconds} ms at {sample_rate} Hz")
    return 2 ** max(0, round(math.log2(milliseconds * sample_rate / 1000)))


def check_sample_rate(rate: Any, where: str) -> int:
    """A whole, positive number of samples per second (16e3 is 16000), checked at the `log_*` call: it is used only
    when a logger writes the clip, where a WAV header with 0 or 22050.5 Hz stopped the run without naming the key."""
    real = isinstance(rate, numbers.Real) and not isinstance(rate, bool) and math.isfinite(rate)
    if not (real and rate == math.floor(rate) and 1 <= rate < 2**31):
        raise ValueError(f"{where}: sample_rate must be a whole number of samples per second >= 1, got {rate!r}")
    return math.floor(rate)


def check_channel_mode(mode: str, where: str) -> None:
    """Refuses a `channel_select_mode` other than 0.2's "first", "last" and "mean"."""
    if mode not in ("first", "last", "mean"):
        raise ValueError(f"{where}: channel_select_mode must be 'first', 'last' or 'mean', got {mode!r}")


def select_channel(channels: np.ndarray, mode: str, where: str) -> np.ndarray:
    """One waveform of a (C, T) clip: its "first" or "last" channel, or the "mean" of all (0.2's modes)."""
    check_channel_mode(mode, where)
    if mode == "mean":
        return channels.mean(axis=0)
    return channels[0] if mode == "first" else channels[-1]


def _colormap(level: np.ndarray) -> np.ndarray:
    """Levels in [0, 1] as uint8 RGB along the gradient stops."""
    channels = [np.interp(level, _CMAP_STOPS, _CMAP_COLORS[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def _stft_magnitude(wave: np.ndarray, n_fft: int, hop: int | None, where: str) -> np.ndarray:
    if n_fft < 2 or (hop is not None and hop < 1):
        raise ValueError(f"{where}: need n_fft >= 2 and hop >= 1, got {n_fft} and {hop}")
    # Zero padding (not reflect) so clips shorter than n_fft work too.
    stft = torch.stft(
        torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)),
        n_fft,
        hop or n_fft // 4,
        window=torch.hann_window(n_fft),
        pad_mode="constant",
        return_complex=True,
    )
    return stft.abs().numpy()


def _spectrogram_picture(magnitude: np.ndarray, peak: float) -> np.ndarray:
    if peak <= 0.0:
        return _colormap(np.zeros_like(magnitude))
    level = 1.0 + np.log10(np.maximum(magnitude, peak * 1e-4) / peak) / 4.0  # 20 * log10(ratio) / 80 dB
    return _colormap(level[::-1])


def make_spectrograms(
    clips: list,
    key: str,
    *,
    sample_rate: int,
    n_fft: int = 512,
    hop: int | None = None,
    channel_select_mode: str = "mean",
    where: str | None = None,
) -> list[np.ndarray]:
    """Log-magnitude STFTs of clips as colored uint8 HWC RGB, 80 dB below the loudest bin of all of them (so clips
    can be compared), silence black.

    A clip's channel is picked by `channel_select_mode` (`select_channel`); hop defaults to n_fft // 4 and a Hann
    window is used. Columns are frames; row r from the top shows the frequency (n_fft // 2 - r) * sample_rate /
    n_fft, so low frequencies are at the bottom.
    """
    where = where or f"log_spectrogram({key!r})"
    if sample_rate <= 0:
        raise ValueError(f"{where}: need sample_rate > 0, got {sample_rate}")
    waves = [select_channel(audio_channels(clip, where), channel_select_mode, where) for clip in clips]
    magnitudes = [_stft_magnitude(wave, n_fft, hop, where) for wave in waves]
    peak = max(float(m.max()) for m in magnitudes)
    return [_spectrogram_picture(m, peak) for m in magnitudes]


def make_spectrogram(
    audio, key: str, *, sample_rate: int, n_fft: int = 512, hop: int | None = None, channel_select_mode: str = "mean"
) -> np.ndarray:
    """One clip's spectrogram (`make_spectrograms`); the clip is read as by `audio_channels`."""
    (picture,) = make_spectrograms(
        [audio], key, sample_rate=sample_rate, n_fft=n_fft, hop=hop, channel_select_mode=channel_select_mode
    )
    return picture


def _resample_indices(num_frames: int, fps: float, target_fps: float) -> np.ndarray:
    """Source frame nearest in time to each output frame, keeping the clip's duration."""
    count = max(1, round(num_frames * target_fps / fps))
    return np.minimum(np.floor(np.arange(count) * fps / target_fps + 0.5).astype(np.int64), num_frames - 1)


def _video_thwc(arr: np.ndarray, where: str) -> np.ndarray:
    """THW (grayscale), TCHW or THWC (TCHW wins when ambiguous) as THWC."""
    shape = tuple(arr.shape)
    if arr.ndim == 3:
        return arr[..., None]
    if arr.ndim == 4 and shape[1] in _CHANNELS:
        return arr.transpose(0, 2, 3, 1)
    if arr.ndim == 4 and shape[-1] in _CHANNELS:
        return arr
    raise ValueError(f"{where}: cannot read a video of shape {shape}; expected THW, TCHW or THWC (C in 1, 3, 4)")


def _render_video(
    thwc: np.ndarray, where: str, fps: float, target_fps: float | None, value_range: ValueRange | None
) -> np.ndarray:
    shape = tuple(thwc.shape)
    if 0 in shape or fps <= 0 or (target_fps is not None and target_fps <= 0):
        raise ValueError(f"{where}: need a non-empty video and positive fps, got {shape} at {fps} -> {target_fps} fps")
    value_range = float_range(thwc[-1]) if value_range is None else value_range
    if target_fps is not None and target_fps != fps:
        thwc = thwc[_resample_indices(len(thwc), fps, target_fps)]  # select first so only kept frames are converted
    return _channels_to_rgb(thwc, where, value_range)


def make_video(
    frames, key: str, *, fps: float, target_fps: float | None = None, value_range: ValueRange | None = None
) -> np.ndarray:
    """Frames (THW grayscale, TCHW, or THWC; TCHW wins when ambiguous; float or uint8) as uint8 THWC RGB, alpha
    dropped; gray frames are shown gray (R = G = B).

    Floats are normalised by `value_range`, by default 0.2's: `float_range` of the last frame, the one a generated
    video (noise denoised into a sample) ends on; earlier frames outside it are clipped. With a target_fps
    different from fps, frames are picked by nearest timestamp.
    """
    where = f"log_video({key!r})"
    return _render_video(_video_thwc(to_numpy(frames), where), where, fps, target_fps, value_range)


def video_batch(value, where: str) -> np.ndarray:
    """A batch of videos as (B, T, H, W, C): an array (B, T, H, W) (grayscale), (B, T, C, H, W) or (B, T, H, W, C),
    or, as 0.2 took it, a list of the frames in time order, each a batch (B, H, W), (B, C, H, W) or (B, H, W, C)
    (what a sampling loop collects step by step)."""
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError(f"{where}: the list of frames is empty")
        frames = [to_numpy(frame) for frame in value]
        shapes = {tuple(f.shape) for f in frames}
        if len(shapes) != 1:
            raise ValueError(f"{where}: every frame batch in the list needs the same shape, got {sorted(shapes)}")
        arr = np.stack(frames, axis=1)
    else:
        arr = to_numpy(value)
    shape = tuple(arr.shape)
    if arr.ndim == 4:
        arr = arr[..., None]
    elif arr.ndim == 5 and shape[2] in _CHANNELS:
        arr = arr.transpose(0, 1, 3, 4, 2)
    elif not (arr.ndim == 5 and shape[-1] in _CHANNELS):
        raise ValueError(
            f"{where}: cannot read videos of shape {shape}; expected (B, T, H, W), (B, T, C, H, W) or "
            "(B, T, H, W, C) with C in 1, 3, 4, or a list of T frame batches"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{where}: the batch is empty")
    return arr


def make_videos(
    batch: np.ndarray,
    key: str,
    *,
    fps: float,
    target_fps: float | None = None,
    max_videos: int | None = None,
    sep: int = 0,
) -> np.ndarray:
    """A batch of videos, (B, T, H, W, C) as `video_batch` returns it, as one uint8 THWC video, tiled frame by
    frame into a near-square grid.

    Floats share one range, `float_range` of every video's last frame (0.2's); `max_videos` keeps the first ones
    (as 0.2 did).
    """
    where = f"log_videos({key!r})"
    if max_videos is not None and max_videos < 1:
        raise ValueError(f"{where}: max_videos must be at least 1, got {max_videos}")
    value_range = float_range(batch[:, -1])
    videos = [_render_video(video, where, fps, target_fps, value_range) for video in batch[:max_videos]]
    return np.stack([tile_images([video[t] for video in videos], sep=sep) for t in range(len(videos[0]))])


_PALETTE = np.array(  # Distinct colors for the clouds of a batch logged without colors.
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75], [227, 119, 194],
     [127, 127, 127], [188, 189, 34], [23, 190, 207]], dtype=np.uint8,
)  # fmt: skip


def _points_last(arr: np.ndarray) -> np.ndarray:
    """0.2's layouts: the axis of 3 coordinates is the last, or else the nearest axis of size 3 before it is moved
    there, so (3, N) and (B, 3, N) read right even with B == 3."""
    if arr.ndim >= 2 and arr.shape[-1] != 3:
        for axis in range(arr.ndim - 2, -1, -1):
            if arr.shape[axis] == 3:
                return np.moveaxis(arr, axis, -1)
    return arr


def subsample_points(
    points, key: str, *, max_points: int = 1000, colors=None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Points as float32 (N, 3), optional colors as uint8 (N, 3), each cloud cut to max_points at random.

    Layouts (0.2's): (N, 3) is one cloud; (B, ..., 3) is B clouds of the points in between, each cut to
    `max_points` (the same indices in each), written as one cloud of B * max_points points; the 3 coordinates may
    also come first, (3, N) or (B, 3, N). Clouds of a batch without colors get one color each (one cloud keeps
    the viewer's default). Sampling is without replacement from a generator seeded with `seed` (reproducible)
    and keeps input order. Float colors are normalised like images (`float_range`: [0, 1] or [0, 255] both work).
    """
    where = f"log_point_cloud({key!r})"
    pts = _points_last(to_numpy(points))
    shape = tuple(pts.shape)
    if pts.ndim < 2 or shape[-1] != 3 or max_points < 1:
        raise ValueError(
            f"{where}: cannot read points of shape {tuple(to_numpy(points).shape)}; expected (N, 3), (B, ..., 3) "
            "or (3, N), max_points >= 1"
        )
    cols = None if colors is None else _points_last(to_numpy(colors))
    if cols is not None and tuple(cols.shape) != shape:
        raise ValueError(f"{where}: colors of shape {tuple(cols.shape)} do not match points of shape {shape}")
    if np.issubdtype(pts.dtype, np.floating):
        note_nonfinite(pts, where, "kept (viewers place or drop such points as they do)")
    pts = pts.reshape(1 if pts.ndim == 2 else shape[0], -1, 3)
    cols = None if cols is None else cols.reshape(pts.shape)
    if pts.shape[1] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(pts.shape[1], size=max_points, replace=False))
        pts, cols = pts[:, keep], None if cols is None else cols[:, keep]
    out_colors = None if cols is None else _to_uint8(cols.reshape(-1, 3), where)
    if out_colors is None and len(pts) > 1:
        out_colors = np.repeat(_PALETTE[np.arange(len(pts)) % len(_PALETTE)], pts.shape[1], axis=0)
    return pts.reshape(-1, 3).astype(np.float32, copy=False), out_colors


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    """Animated GIF of uint8 (T, H, W, 3) frames. Written with Pillow because torch's `add_video` needs
    `moviepy.editor`, which moviepy 2 removed (it then silently writes nothing). GIF frame times are in 10 ms
    units (Pillow truncates to them) and browsers play anything under 20 ms at 100 ms, so faster videos get 20 ms
    frames; slower ones get times whose running total stays within 5 ms of k * 1000 / fps (12 fps: 80, 90, 80, ...
    ms, 1000 ms a second, where 80 ms frames would play 960)."""
    out = io.BytesIO()
    pictures = [Image.fromarray(f) for f in frames]
    if fps <= 0:
        duration: int | list[int] = 100
    elif fps > 50:
        duration = 20
    else:
        ends = [10 * math.floor(k * 100 / fps + 0.5) for k in range(len(pictures) + 1)]  # Rounded to 10 ms.
        duration = np.diff(ends).tolist()
    pictures[0].save(out, format="GIF", save_all=True, append_images=pictures[1:], duration=duration, loop=0)
    return out.getvalue()


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A 16-bit PCM WAV file of float samples in [-1, 1], (T,) mono or (T, C) with every channel kept (torch's
    `add_audio` takes mono only)."""
    frames = samples[:, None] if samples.ndim == 1 else samples
    pcm = np.rint(np.clip(frames, -1.0, 1.0) * 32767.0).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(frames.shape[1])
        wav.setsampwidth(2)
        wav.setframerate(int(sample_rate))
        wav.writeframes(np.ascontiguousarray(pcm).tobytes())
    return out.getvalue()

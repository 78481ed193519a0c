"""Tests for mlfab.logs.media: what a user sees after logging images, audio, video and point clouds."""

import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mlfab.logs.api import LogMethods
from mlfab.logs.media import (
    add_caption,
    caption_rows,
    make_image,
    make_images,
    make_spectrogram,
    make_video,
    normalize_audio,
    normalize_image,
    resize_to_area,
    split_batch,
    subsample_points,
    tile_images,
    to_numpy,
)

pytestmark = pytest.mark.unit

RED = [255, 0, 0]


def _dark_pixels(img: np.ndarray) -> int:
    return int((img.max(axis=-1) < 100).sum())


# to_numpy


def test_to_numpy_tensor_bfloat16_with_grad() -> None:
    tensor = torch.tensor([0.25, 0.5, 1.0], dtype=torch.bfloat16, requires_grad=True)
    out = to_numpy(tensor)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [0.25, 0.5, 1.0])


def test_to_numpy_pil_image_keeps_pixels() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_numpy(Image.fromarray(pixels)), pixels)


def test_to_numpy_palette_image_becomes_rgba() -> None:
    img = Image.new("P", (4, 3))
    img.putpalette([10, 20, 30] * 256)
    out = to_numpy(img)
    assert out.shape == (3, 4, 4)
    assert out[0, 0, :3].tolist() == [10, 20, 30]


# normalize_image: layouts


@pytest.mark.parametrize(
    ("shape", "index"),
    [
        ((6, 8, 3), (2, 5, 0)),  # HWC: red channel is last
        ((3, 6, 8), (0, 2, 5)),  # CHW: red channel is first
        ((6, 8, 4), (2, 5, 0)),  # HWC with alpha
        ((4, 6, 8), (0, 2, 5)),  # CHW with alpha
    ],
)
def test_normalize_image_layouts_put_red_at_the_right_pixel(shape: tuple[int, ...], index: tuple[int, ...]) -> None:
    arr = np.zeros(shape, dtype=np.float32)
    arr[index] = 1.0
    out = normalize_image(torch.from_numpy(arr), "img")
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    assert out[2, 5].tolist() == RED
    out[2, 5] = 0
    assert not out.any()


def test_normalize_image_gray_layouts_expand_to_rgb() -> None:
    hw = np.zeros((6, 8), dtype=np.uint8)
    hw[1, 2] = 77
    for arr in (hw, hw[None], hw[:, :, None]):  # HW, 1HW, HW1
        out = normalize_image(arr, "img")
        assert out.shape == (6, 8, 3)
        assert out[1, 2].tolist() == [77, 77, 77]
        assert out.sum() == 3 * 77


def test_normalize_image_drops_alpha_instead_of_compositing() -> None:
    rgba = np.zeros((5, 5, 4), dtype=np.uint8)
    rgba[..., 1] = 200  # green, fully transparent
    assert normalize_image(rgba, "img")[0, 0].tolist() == [0, 200, 0]


def test_normalize_image_prefers_hwc_when_both_ends_look_like_channels() -> None:
    arr = np.zeros((3, 10, 3), dtype=np.uint8)
    assert normalize_image(arr, "img").shape == (3, 10, 3)


def test_normalize_image_pil_input() -> None:
    img = Image.new("RGB", (7, 5), (1, 2, 3))
    out = normalize_image(img, "img")
    assert out.shape == (5, 7, 3) and out[4, 6].tolist() == [1, 2, 3]


# normalize_image: values


def test_normalize_image_floats_are_min_max_normalised_as_in_02() -> None:
    # mlfab 0.2's normalisation: [min(lowest, 0), max(highest, 1)] maps to [0, 255]; here [-0.5, 2].
    arr = np.array([[-0.5, 0.0, 0.5, 1.0, 2.0, np.nan]], dtype=np.float64)
    assert normalize_image(arr, "img")[0, :, 0].tolist() == [0, 51, 102, 153, 255, 0]
    inside = np.array([[0.25, 0.5, 0.75]], dtype=np.float32)  # Already in [0, 1]: unchanged, not stretched.
    assert normalize_image(inside, "img")[0, :, 0].tolist() == [64, 128, 191]


def test_normalize_image_float16_tensor() -> None:
    out = normalize_image(torch.full((3, 5, 5), 0.5, dtype=torch.float16), "img")
    assert (out == 128).all()


def test_normalize_image_bool_and_ints() -> None:
    assert normalize_image(np.array([[True, False]]), "img")[0, :, 0].tolist() == [255, 0]
    ints = np.array([[-5, 100, 300]], dtype=np.int16)
    assert normalize_image(ints, "img")[0, :, 0].tolist() == [0, 100, 255]
    small = np.array([[-128, 127]], dtype=np.int8)
    assert normalize_image(small, "img")[0, :, 0].tolist() == [0, 127]


def test_normalize_image_keeps_uint8_values() -> None:
    arr = np.random.default_rng(1).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(normalize_image(arr, "img"), arr)


def test_normalize_image_bad_shape_message() -> None:
    expected = "log_image('images'): cannot read an image of shape (2, 5, 5, 5); expected HW, CHW or HWC (C in 1, 3, 4)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        normalize_image(np.zeros((2, 5, 5, 5)), "images")


@pytest.mark.parametrize("shape", [(5,), (5, 5, 5), (2, 6, 7), (0, 4)])
def test_normalize_image_other_bad_shapes_name_key_and_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=re.escape("log_image('pic'): ")) as info:
        normalize_image(np.zeros(shape), "pic")
    assert str(shape) in str(info.value)


def test_normalize_image_rejects_complex() -> None:
    with pytest.raises(ValueError, match="log_image\\('c'\\).*complex"):
        normalize_image(np.zeros((4, 4), dtype=np.complex64), "c")


# split_batch


def test_split_batch_bhw() -> None:
    images = split_batch(np.zeros((4, 6, 8)), "b")
    assert [img.shape for img in images] == [(6, 8)] * 4


def test_split_batch_bchw_red_pixel() -> None:
    batch = torch.zeros(2, 3, 6, 8)
    batch[1, 0, 2, 5] = 1.0
    images = [normalize_image(img, "b") for img in split_batch(batch, "b")]
    assert [img.shape for img in images] == [(6, 8, 3)] * 2
    assert images[1][2, 5].tolist() == RED and images[1].sum() == 255 and not images[0].any()


def test_split_batch_bchw_with_narrow_width_is_not_misread() -> None:
    batch = np.zeros((2, 3, 6, 3), dtype=np.float32)  # W == 3 would look like HWC if split naively
    batch[0, 0, 4, 1] = 1.0
    image = normalize_image(split_batch(batch, "b")[0], "b")
    assert image.shape == (6, 3, 3) and image[4, 1].tolist() == RED


def test_split_batch_bhwc_and_list() -> None:
    batch = np.zeros((3, 6, 8, 3), dtype=np.uint8)
    assert [img.shape for img in split_batch(batch, "b")] == [(6, 8, 3)] * 3
    mixed = split_batch([torch.zeros(3, 4, 4), np.zeros((5, 5))], "b")
    assert [img.shape for img in mixed] == [(3, 4, 4), (5, 5)]


@pytest.mark.parametrize("shape", [(6, 8), (2, 5, 6, 7), (1, 2, 3, 4, 5)])
def test_split_batch_bad_shape_names_key(shape: tuple[int, ...]) -> None:
    expected = f"log_images('grid'): cannot read a batch of images of shape {shape}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        split_batch(np.zeros(shape), "grid")


# resize_to_area


@pytest.mark.parametrize(("height", "width"), [(100, 50), (28, 28), (1024, 512), (30, 400), (8, 8)])
def test_resize_keeps_aspect_and_lands_near_target(height: int, width: int) -> None:
    out = resize_to_area(np.zeros((height, width, 3), dtype=np.uint8), target_area=256 * 256)
    new_h, new_w = out.shape[:2]
    assert abs(new_w - new_h * width / height) <= 1 and abs(new_h - new_w * height / width) <= 1
    assert abs(new_h * new_w - 256 * 256) / (256 * 256) < 0.02
    assert out.dtype == np.uint8 and out.shape[2] == 3


def test_resize_upscale_is_nearest_so_pixels_stay_crisp() -> None:
    checker = ((np.indices((8, 8)).sum(axis=0) % 2) * 255).astype(np.uint8)
    img = np.repeat(checker[:, :, None], 3, axis=-1)
    out = resize_to_area(img, target_area=64 * 64)
    assert out.shape == (64, 64, 3)
    assert set(np.unique(out).tolist()) == {0, 255}
    np.testing.assert_array_equal(out[::8, ::8], img)


def test_resize_downscale_smooths() -> None:
    stripes = np.zeros((64, 64, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    out = resize_to_area(stripes, target_area=32 * 32)
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - 128).max() <= 1  # averaged, not aliased to 0 or 255


def test_resize_keep_resolution_returns_input() -> None:
    img = np.zeros((10, 20, 3), dtype=np.uint8)
    assert resize_to_area(img, keep_resolution=True) is img


# captions


def test_add_caption_appends_strip_with_dark_text_below() -> None:
    img = np.random.default_rng(2).integers(100, 256, size=(40, 120, 3), dtype=np.uint8)
    out = add_caption(img, "hello world")
    assert out.dtype == np.uint8 and out.shape[1] == 120 and out.shape[0] > 40
    np.testing.assert_array_equal(out[:40], img)
    strip = out[40:]
    assert _dark_pixels(strip) > 10
    assert (strip == 255).all(axis=-1).mean() > 0.5  # mostly white background


def test_add_caption_wraps_long_text_to_the_width() -> None:
    text = "a fairly long caption that cannot possibly fit on one line of a narrow image"
    assert caption_rows(60, text) > 2
    assert caption_rows(2000, text) == 1
    narrow = add_caption(np.zeros((10, 60, 3), dtype=np.uint8), text)
    wide = add_caption(np.zeros((10, 2000, 3), dtype=np.uint8), text)
    assert narrow.shape[0] > wide.shape[0]
    assert (narrow[10:, -1] == 255).all()  # no text runs into the right edge


def test_add_caption_rows_fixes_strip_height() -> None:
    img = np.zeros((10, 100, 3), dtype=np.uint8)
    one, three = add_caption(img, "x", rows=1), add_caption(img, "x", rows=3)
    assert three.shape[0] > one.shape[0]
    long_cut = add_caption(img, "word " * 100, rows=1)
    assert long_cut.shape == one.shape


def test_add_caption_max_line_chars_adds_rows() -> None:
    img = np.zeros((10, 400, 3), dtype=np.uint8)
    assert add_caption(img, "abc def ghi", max_line_chars=3).shape[0] > add_caption(img, "abc def ghi").shape[0]


def test_make_image_with_label() -> None:
    out = make_image(np.ones((3, 8, 8)), "lab", label="digit 3")
    assert out.shape[0] > 256 and out.shape[1] == 256
    assert (out[:256] == 255).all()
    assert _dark_pixels(out[256:]) > 0


def test_make_images_with_labels_equal_strips_even_with_one_long_caption() -> None:
    batch = np.ones((2, 3, 8, 8), dtype=np.float32)  # white images
    labels = ["a", "this caption is much much longer than the other one and needs several rows to fit " * 2]
    grid = make_images(batch, "lab", labels=labels, keep_resolution=True)
    left, right = grid[:, :8], grid[:, 10:]
    assert (grid[-1, :8] == 255).all() and (grid[-1, 10:] == 255).all()  # both cells end in white strip, no padding
    assert _dark_pixels(left[8:]) > 0 and _dark_pixels(right[8:]) > _dark_pixels(left[8:])
    assert grid.shape[0] > 8 + caption_rows(8, labels[0]) * 8


def test_make_images_with_labels_label_count_mismatch() -> None:
    with pytest.raises(ValueError, match=re.escape("log_labeled_images('lab'): got 3 images but 2 labels")):
        make_images(np.zeros((3, 8, 8)), "lab", labels=["a", "b"])


def test_make_images_with_labels_max_images() -> None:
    grid = make_images(np.zeros((5, 8, 8)), "lab", labels=list("abcde"), max_images=2, keep_resolution=True)
    assert grid.shape[1] == 8 + 2 + 8


# tiling


def _numbered(count: int, height: int = 10, width: int = 12) -> list[np.ndarray]:
    return [np.full((height, width, 3), 40 * (i + 1), dtype=np.uint8) for i in range(count)]


def test_tile_five_images_in_three_by_two_grid() -> None:
    grid = tile_images(_numbered(5), sep=2)
    assert grid.shape == (2 * 10 + 2, 3 * 12 + 2 * 2, 3)
    for i in range(5):
        row, col = divmod(i, 3)
        y, x = row * 12, col * 14
        assert (grid[y : y + 10, x : x + 12] == 40 * (i + 1)).all()
    assert not grid[10:12].any() and not grid[:, 12:14].any()  # black separators
    assert not grid[12:, 28:].any()  # empty sixth cell


def test_tile_sep_zero_and_max_images() -> None:
    assert tile_images(_numbered(5), sep=0).shape == (20, 36, 3)
    grid = tile_images(_numbered(5), sep=2, max_images=4)
    assert grid.shape == (22, 26, 3)
    assert 200 not in grid  # fifth image (value 200) dropped


def test_tile_pads_smaller_images_to_the_largest() -> None:
    grid = tile_images([np.full((4, 6, 3), 9, np.uint8), np.full((10, 3, 3), 7, np.uint8)], sep=1)
    assert grid.shape == (10, 6 + 1 + 6, 3)
    assert (grid[:4, :6] == 9).all() and not grid[4:, :6].any()


def test_tile_empty_raises() -> None:
    with pytest.raises(ValueError):
        tile_images([])


# make_image / make_images


def test_make_image_resizes_digit_to_target_area() -> None:
    digit = torch.rand(1, 28, 28)
    out = make_image(digit, "digit")
    assert out.shape == (256, 256, 3)
    assert make_image(digit, "digit", keep_resolution=True).shape == (28, 28, 3)


def test_make_images_grid_shape_and_max_images() -> None:
    batch = torch.rand(5, 3, 8, 8)
    assert make_images(batch, "b", keep_resolution=True).shape == (2 * 8 + 2, 3 * 8 + 2 * 2, 3)
    assert make_images(batch, "b", keep_resolution=True, max_images=4, sep=0).shape == (16, 16, 3)
    assert make_images(batch, "b").shape == (2 * 256 + 2, 3 * 256 + 4, 3)


def test_make_images_bad_item_names_key_and_index() -> None:
    with pytest.raises(ValueError, match=re.escape("log_images('b') image 1: cannot read an image of shape (5, 5, 5)")):
        make_images([np.zeros((5, 5)), np.zeros((5, 5, 5))], "b")


# audio


def test_spectrogram_sine_brightest_row_at_its_frequency_bin() -> None:
    sample_rate, n_fft, bin_index = 8000, 512, 64
    t = np.arange(sample_rate) / sample_rate
    sine = np.sin(2 * math.pi * bin_index * sample_rate / n_fft * t).astype(np.float32)
    img = make_spectrogram(torch.from_numpy(sine), "spec", sample_rate=sample_rate, n_fft=n_fft)
    num_bins = n_fft // 2 + 1
    assert img.dtype == np.uint8 and img.shape == (num_bins, 1 + len(sine) // (n_fft // 4), 3)
    brightness = img.astype(np.float64).sum(axis=-1).mean(axis=1)
    assert int(brightness.argmax()) == num_bins - 1 - bin_index  # low frequencies at the bottom


def test_spectrogram_mixes_channels_and_handles_silence_and_short_clips() -> None:
    stereo = np.random.default_rng(3).normal(size=(2, 4000)).astype(np.float32)
    assert make_spectrogram(stereo, "s", sample_rate=16000, n_fft=256, hop=64).shape == (129, 63, 3)
    silence = make_spectrogram(np.zeros(1000), "s", sample_rate=16000)
    assert silence.max() < 10  # black-ish, not bright
    assert make_spectrogram(np.ones(100), "s", sample_rate=16000).shape[0] == 257


def test_spectrogram_bad_shape_names_key() -> None:
    with pytest.raises(ValueError, match=re.escape("log_spectrogram('s'): cannot read audio of shape (2, 3, 100)")):
        make_spectrogram(np.zeros((2, 3, 100)), "s", sample_rate=16000)


def test_normalize_audio_layouts_and_peak_normalisation() -> None:
    mono = normalize_audio(torch.tensor([0.5, 2.0, -3.0]), "a")  # 0.2: divided by the peak when it exceeds 1
    assert mono.dtype == np.float32 and mono.tolist() == pytest.approx([0.5 / 3, 2.0 / 3, -1.0])
    assert normalize_audio(torch.tensor([0.5, -0.25]), "a").tolist() == [0.5, -0.25]  # quieter audio is unchanged
    stereo = normalize_audio(np.stack([np.zeros(10), np.ones(10)]), "a")
    assert stereo.shape == (10, 2) and stereo[:, 1].tolist() == [1.0] * 10
    pcm = normalize_audio(np.array([-32768, 16384], dtype=np.int16), "a")
    assert pcm.tolist() == [-1.0, 0.5]


def test_normalize_audio_time_major_stereo_is_read_as_02_read_it() -> None:
    clip = np.zeros((16000, 2), dtype=np.float32)  # (T, C): 0.2 accepted it, as mlfab does again
    clip[:, 1] = 0.5
    out = normalize_audio(clip, "a")
    assert out.shape == (16000, 2) and (out[:, 1] == 0.5).all() and not out[:, 0].any()
    with pytest.raises(ValueError, match=re.escape("log_audio('a'): cannot read audio of shape (16000, 3)")):
        normalize_audio(np.zeros((16000, 3)), "a")


# video


def test_video_resample_30_to_10_fps_picks_every_third_frame() -> None:
    frames = np.arange(30, dtype=np.uint8)[:, None, None, None] * np.ones((1, 3, 4, 5), dtype=np.uint8)  # TCHW
    out = make_video(frames, "v", fps=30, target_fps=10)
    assert out.shape == (10, 4, 5, 3) and out.dtype == np.uint8
    assert out[:, 0, 0, 0].tolist() == list(range(0, 30, 3))


def test_video_resample_uneven_ratio_picks_nearest_timestamps() -> None:
    frames = np.arange(30, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), dtype=np.uint8)  # THWC
    out = make_video(frames, "v", fps=30, target_fps=7)  # output frame j is at j / 7 s = source frame 30 * j / 7
    assert out[:, 0, 0, 0].tolist() == [0, 4, 9, 13, 17, 21, 26]


def test_video_thwc_float_and_upsampling() -> None:
    frames = torch.linspace(0, 1, 10)[:, None, None, None].expand(10, 6, 7, 1)  # THWC gray
    out = make_video(frames, "v", fps=10)
    assert out.shape == (10, 6, 7, 3) and out[0].max() == 0 and out[-1].min() == 255
    up = make_video(frames, "v", fps=10, target_fps=30)
    assert len(up) == 30 and up[-1, 0, 0, 0] == 255


def test_video_bad_shape_names_key() -> None:
    with pytest.raises(ValueError, match=re.escape("log_video('v'): cannot read a video of shape (2, 5, 6, 7)")):
        make_video(np.zeros((2, 5, 6, 7)), "v", fps=30)


# point clouds


def test_subsample_points_distinct_and_reproducible() -> None:
    points = np.arange(50_000 * 3, dtype=np.float64).reshape(-1, 3)
    sub, colors = subsample_points(points, "pc", max_points=1000)
    assert colors is None and sub.shape == (1000, 3) and sub.dtype == np.float32
    assert len(np.unique(sub, axis=0)) == 1000
    assert np.isin(sub[:, 0], points[:, 0]).all()
    again, _ = subsample_points(torch.from_numpy(points), "pc", max_points=1000)
    np.testing.assert_array_equal(sub, again)
    other, _ = subsample_points(points, "pc", max_points=1000, seed=1)
    assert not np.array_equal(sub, other)


def test_subsample_points_colors_follow_their_points() -> None:
    points = np.random.default_rng(4).random((2, 3000, 3))  # (B, N, 3): two clouds, each cut to max_points (0.2)
    sub, colors = subsample_points(points, "pc", max_points=500, colors=points)
    assert sub.shape == (1000, 3) and colors is not None and colors.dtype == np.uint8
    np.testing.assert_array_equal(colors, np.rint(sub * 255).astype(np.uint8))


def test_subsample_points_small_cloud_unchanged() -> None:
    points = np.random.default_rng(5).random((20, 3)).astype(np.float32)
    sub, _ = subsample_points(points, "pc", max_points=100)
    np.testing.assert_array_equal(sub, points)


def test_subsample_points_bad_shapes_name_key() -> None:
    with pytest.raises(ValueError, match=re.escape("log_point_cloud('pc'): cannot read points of shape (10, 2)")):
        subsample_points(np.zeros((10, 2)), "pc")
    with pytest.raises(ValueError, match=re.escape("log_point_cloud('pc'): colors of shape (9, 3)")):
        subsample_points(np.zeros((10, 3)), "pc", colors=np.zeros((9, 3)))


class Logged(LogMethods):
    """The `log_*` methods alone: what each call stores, by key."""

    def __init__(self) -> None:
        self.stored: dict[str, Any] = {}

    def _log(self, kind: str, key: str, value: Any, namespace: str | None) -> None:
        self.stored[key] = value


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("log_audios", torch.zeros(0, 100)),
        ("log_spectrograms", torch.zeros(0, 100)),
        ("log_videos", torch.zeros(0, 3, 4, 4, 3)),
    ],
)
def test_an_empty_batch_is_reported_by_the_call_that_logged_it(name: str, value: torch.Tensor) -> None:
    logged = Logged()
    getattr(logged, name)("k", value, **({"log_spec": False} if name == "log_audios" else {}))
    with pytest.raises(ValueError, match=rf"^{name}\('k'\): the batch is empty$"):
        logged.stored["k"]()

"""Images to ViT patches exactly as Qwen3-VL's processor makes them.

decode -> RGB -> ``smart_resize`` to multiples of 32 within the pixel budget -> bicubic resize (PIL,
as the released ``Qwen2VLImageProcessor`` with the PIL backend; skipped when the size already fits)
-> x/255 -> (x - 0.5)/0.5 -> block-major patches ``[t*h*w, 3*2*16*16]`` with rows flattened as
(C, T, Ph, Pw) and ``grid_thw`` (t, h, w) in 16-pixel patches. An image is one temporal patch whose
two frames are identical.

Speed: this is the hot path of image samples, so beyond the decode it does only the unavoidable
arithmetic. The encoder keeps a medium as its decoded uint8 frames (``DecodedFrames``); when the
packer builds a row, each frame becomes one planar float32 array, normalised in place, and every
output element is written once, straight into the row's pixel tensor (the second temporal frame by
broadcasting). No float64, no per-sample float buffer, no concatenation copy.
"""
from __future__ import annotations

import io
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from PIL import Image

from qwen3vl.data.sample_format import BadSample

MAX_ASPECT_RATIO = 200
MEAN = 0.5
STD = 0.5


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, about the same aspect ratio, and
    ``min_pixels <= h*w <= max_pixels`` (rounded to the nearest multiple first, then scaled down
    with floor or up with ceil)."""
    if height <= 0 or width <= 0:
        raise BadSample("zero_size_image", f"image of size {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise BadSample("extreme_aspect_ratio",
                        f"image {width}x{height} has aspect ratio > {MAX_ASPECT_RATIO}")
    return fit_pixel_budget(height, width, factor, min_pixels, max_pixels)


def fit_pixel_budget(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                     frames: int = 1, rounded_frames: int = 1) -> tuple[int, int]:
    """The scaling step shared by images (1 frame) and videos (budget over ``frames`` frames, checked
    with the frame count rounded to the temporal patch, scaled with the real count, as HF does)."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if rounded_frames * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif rounded_frames * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def open_image(data: bytes, name: str = "image") -> Image.Image:
    """Parses only the header (size, mode), so a sample can be sized before any pixel is decoded."""
    with _image_errors(name):
        image = Image.open(io.BytesIO(data))
    if image.width == 0 or image.height == 0:
        raise BadSample("zero_size_image", f"{name}: size {image.width}x{image.height}")
    return image


def load_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Decodes the pixels of an opened image and converts them to RGB."""
    with _image_errors(name):
        image.load()
    return to_rgb(image)


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """Bytes to an RGB PIL image; undecodable, truncated, empty or bomb-sized data -> BadSample."""
    return load_rgb(open_image(data, name), name)


@contextmanager
def _image_errors(name: str):
    """Maps PIL's failures to BadSample reasons."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("image_too_large", f"{name}: {e}") from None
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt_image"
        raise BadSample(reason, f"{name}: {e}") from None
    except Exception as e:  # PIL raises assorted errors on garbage (ValueError, SyntaxError...)
        raise BadSample("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way transformers' ``convert_to_rgb`` does: anything with alpha or a transparency key is
    composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_rgb(image: Image.Image, height: int, width: int) -> Image.Image:
    """Bicubic resize to ``height`` x ``width`` (PIL, on uint8 like the processor's PIL backend); an image
    already of that size is returned as it is (no resampling pass, no copy)."""
    if (image.height, image.width) == (height, width):
        return image
    return image.resize((width, height), resample=Image.Resampling.BICUBIC)


def normalized_planes(frame: np.ndarray) -> np.ndarray:
    """[3, H, W] float32 in [-1, 1] of an RGB frame [H, W, 3] uint8: x/255 then (x - mean)/std.

    Written as (x / 255 - 0.5) * 2 in float32 (std 0.5: the division is exact as a multiplication),
    which equals transformers' float64 rescale followed by its float32 normalise bit for bit for all
    256 input values (tests/data/test_image_processing.py checks the table). One strided uint8 read
    into planar float32, then in-place arithmetic: no float64, no temporaries of the image size.
    """
    planes = frame.transpose(2, 0, 1).astype(np.float32, order="C")
    np.divide(planes, np.float32(255), out=planes)
    planes -= np.float32(MEAN)
    planes *= np.float32(1 / STD)
    return planes


def patch_view(out: np.ndarray, grid: tuple[int, int, int], channels: int = 3, patch_size: int = 16,
               merge_size: int = 2, temporal_patch_size: int = 2) -> np.ndarray:
    """``out`` [t*h*w, C*Tp*P*P] seen as (t, block_row, block_col, r, c, C, Tp, Ph, Pw): the Conv3d row
    layout, block-major (2x2 merge blocks in raster order, raster inside a block)."""
    t, h, w = grid
    m, p = merge_size, patch_size
    return out.reshape(t, h // m, w // m, m, m, channels, temporal_patch_size, p, p)


def frame_as_patches(frame: np.ndarray, patch_size: int = 16, merge_size: int = 2) -> np.ndarray:
    """A view of one frame [C, H, W] in the (block_row, block_col, r, c, C, Ph, Pw) order of ``patch_view``."""
    C, H, W = frame.shape
    m, p = merge_size, patch_size
    return frame.reshape(C, H // (m * p), m, p, W // (m * p), m, p).transpose(1, 4, 2, 5, 0, 3, 6)


def patchify_into(out: np.ndarray, frames, patch_size: int = 16, merge_size: int = 2,
                  temporal_patch_size: int = 2) -> tuple[int, int, int]:
    """Writes ``frames`` (a sequence of [C, H, W] arrays, length a multiple of the temporal patch) into
    ``out`` [t*h*w, C*Tp*P*P] as ViT patch rows; returns the grid (t, h, w). Every output element is
    written once; a temporal patch whose frames are one array (an image, a padded last video frame)
    is written from it by broadcasting, so the duplicate frame is never materialised."""
    tp = temporal_patch_size
    C, H, W = frames[0].shape
    grid = (len(frames) // tp, H // patch_size, W // patch_size)
    rows = patch_view(out, grid, C, patch_size, merge_size, tp)
    for k in range(grid[0]):
        group = frames[k * tp:(k + 1) * tp]
        if all(f is group[0] for f in group):
            rows[k] = frame_as_patches(group[0], patch_size, merge_size)[:, :, :, :, :, None]
        else:
            for j, frame in enumerate(group):
                rows[k, :, :, :, :, :, j] = frame_as_patches(frame, patch_size, merge_size)
    return grid


@dataclass
class DecodedFrames:
    """An image or a sampled clip, decoded and resized but not normalised: uint8 frames [H, W, 3], padded
    to a multiple of the temporal patch (a repeated frame is the same array). Its float32 patch rows,
    eight times the size, are written only where they are needed, straight into the packed row
    (``write``), so a sample waiting in the packer's buffer holds bytes, not floats."""

    frames: tuple[np.ndarray, ...]
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2

    @cached_property
    def grid(self) -> tuple[int, int, int]:
        height, width = self.frames[0].shape[:2]
        return len(self.frames) // self.temporal_patch_size, height // self.patch_size, width // self.patch_size

    @cached_property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def write(self, out: np.ndarray) -> None:
        """The patch rows [num_patches, 3 * Tp * P * P] float32 into ``out``, one temporal patch at a time
        (each distinct frame normalised once)."""
        tp = self.temporal_patch_size
        _, h, w = self.grid
        for k in range(len(self.frames) // tp):
            group = self.frames[k * tp:(k + 1) * tp]
            planes = {id(f): normalized_planes(f) for f in {id(f): f for f in group}.values()}
            patchify_into(out[k * h * w:(k + 1) * h * w], [planes[id(f)] for f in group], self.patch_size,
                          self.merge_size, tp)

    def pixel_values(self) -> torch.Tensor:
        out = np.empty((self.num_patches, 3 * self.temporal_patch_size * self.patch_size ** 2), dtype=np.float32)
        self.write(out)
        return torch.from_numpy(out)


def rgb_frame(image: Image.Image, height: int, width: int) -> np.ndarray:
    """[height, width, 3] uint8 of an RGB image, resized if it is not that size already."""
    return np.asarray(resize_rgb(image, height, width))


def patchify(frames: np.ndarray, patch_size: int = 16, merge_size: int = 2,
             temporal_patch_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``frames`` [T, C, H, W] (T a multiple of temporal_patch_size) -> (patches [t*h*w, C*Tp*P*P],
    (t, h, w)). Row order: for each temporal patch, 2x2 merge blocks in raster order, raster inside a
    block; each row flattened (C, T, Ph, Pw) like the Conv3d kernel."""
    T, C, H, W = frames.shape
    out = np.empty(((T // temporal_patch_size) * (H // patch_size) * (W // patch_size),
                    C * temporal_patch_size * patch_size * patch_size), dtype=frames.dtype)
    grid = patchify_into(out, list(frames), patch_size, merge_size, temporal_patch_size)
    return torch.from_numpy(out), grid


def image_grid(height: int, width: int, min_pixels: int = 65536, max_pixels: int = 16777216,
               patch_size: int = 16, merge_size: int = 2) -> tuple[int, int, int]:
    """(1, h, w) in patches for an image of this size, without touching its pixels."""
    h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    return 1, h // patch_size, w // patch_size


def image_frames(image: Image.Image, min_pixels: int = 65536, max_pixels: int = 16777216, patch_size: int = 16,
                 merge_size: int = 2, temporal_patch_size: int = 2) -> DecodedFrames:
    """One RGB image at its ``smart_resize`` size: one temporal patch of two identical frames."""
    height, width = smart_resize(image.height, image.width, patch_size * merge_size, min_pixels, max_pixels)
    frame = rgb_frame(image, height, width)
    return DecodedFrames((frame,) * temporal_patch_size, patch_size, merge_size, temporal_patch_size)


def process_image(image: Image.Image, min_pixels: int = 65536, max_pixels: int = 16777216,
                  patch_size: int = 16, merge_size: int = 2,
                  temporal_patch_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One RGB image -> (pixel_values [h*w, 1536] float32, grid (1, h, w))."""
    frames = image_frames(image, min_pixels, max_pixels, patch_size, merge_size, temporal_patch_size)
    return frames.pixel_values(), frames.grid

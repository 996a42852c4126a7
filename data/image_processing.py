"""Images to ViT patches exactly as Qwen3-VL's processor makes them (spec §1, §6).

decode -> RGB -> ``smart_resize`` to multiples of 32 within the pixel budget -> bicubic resize (PIL,
as the released ``Qwen2VLImageProcessor`` with the PIL backend) -> x/255 -> (x - 0.5)/0.5 ->
block-major patches ``[t*h*w, 3*2*16*16]`` with rows flattened as (C, T, Ph, Pw) and ``grid_thw``
(t, h, w) in 16-pixel patches. An image is one temporal patch whose two frames are identical.
"""
from __future__ import annotations

import io
import math
import warnings
from contextlib import contextmanager

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


def resize_and_normalize(image: Image.Image, height: int, width: int) -> np.ndarray:
    """[3, height, width] float32 in [-1, 1]: bicubic resize, then x/255, then (x - mean)/std."""
    if (image.height, image.width) != (height, width):
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    return (pixels - np.float32(MEAN)) / np.float32(STD)


def patchify(frames: np.ndarray, patch_size: int = 16, merge_size: int = 2,
             temporal_patch_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``frames`` [T, C, H, W] (T a multiple of temporal_patch_size) -> (patches [t*h*w, C*Tp*P*P],
    (t, h, w)). Row order: for each temporal patch, 2x2 merge blocks in raster order, raster inside a
    block; each row flattened (C, T, Ph, Pw) like the Conv3d kernel."""
    T, C, H, W = frames.shape
    t, h, w = T // temporal_patch_size, H // patch_size, W // patch_size
    m, p, tp = merge_size, patch_size, temporal_patch_size
    x = frames.reshape(t, tp, C, h // m, m, p, w // m, m, p)
    # -> (t, block_row, block_col, r, c, C, tp, Ph, Pw)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return torch.from_numpy(np.ascontiguousarray(x).reshape(t * h * w, C * tp * p * p)), (t, h, w)


def image_grid(height: int, width: int, min_pixels: int = 65536, max_pixels: int = 16777216,
               patch_size: int = 16, merge_size: int = 2) -> tuple[int, int, int]:
    """(1, h, w) in patches for an image of this size, without touching its pixels."""
    h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    return 1, h // patch_size, w // patch_size


def process_image(image: Image.Image, min_pixels: int = 65536, max_pixels: int = 16777216,
                  patch_size: int = 16, merge_size: int = 2,
                  temporal_patch_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One RGB image -> (pixel_values [h*w, 1536] float32, grid (1, h, w))."""
    height, width = smart_resize(image.height, image.width, patch_size * merge_size, min_pixels, max_pixels)
    pixels = resize_and_normalize(image, height, width)
    frames = np.broadcast_to(pixels[None], (temporal_patch_size, *pixels.shape))
    return patchify(frames, patch_size, merge_size, temporal_patch_size)

"""Videos (stored as decoded frames with timestamps) to ViT patches and the timestamped prompt, as
transformers' Qwen3-VL video processor and chat template make them.

Sampling follows transformers' ``Qwen3VLVideoProcessor.sample_frames``: n = int(duration * fps),
clamped to [min_frames, max_frames] and to the stored frame count, indices = round(linspace(0, N-1, n)).
An odd n is made even by repeating the last frame (HF pads in ``patchify``; qwen-vl-utils floors
instead; we pad so that short clips keep every sampled frame). Frames (2k, 2k+1) form temporal
patch k; its timestamp is the mean of their two timestamps. All frames share one size from the joint
T*H*W pixel budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from qwen3vl.data.image_processing import MAX_ASPECT_RATIO, DecodedFrames, fit_pixel_budget, rgb_frame
from qwen3vl.data.sample_format import BadSample


def sample_frame_indices(num_frames: int, stored_fps: float, fps: float = 2.0, min_frames: int = 4,
                         max_frames: int = 768) -> list[int]:
    """Indices into ``num_frames`` stored frames (rate ``stored_fps``) sampled at ``fps``."""
    n = int(num_frames / stored_fps * fps)
    n = min(max(n, min_frames), max_frames, num_frames)
    return np.linspace(0, num_frames - 1, n).round().astype(int).tolist()


def pad_to_multiple(indices: list[int], multiple: int = 2) -> list[int]:
    """Repeats the last index until the count is a multiple of ``multiple`` (the temporal patch)."""
    return indices + [indices[-1]] * (-len(indices) % multiple)


def group_timestamps(frame_times: list[float], temporal_patch_size: int = 2) -> list[float]:
    """One time per temporal patch: the mean of its first and last frame time (frames already padded)."""
    tp = temporal_patch_size
    return [(frame_times[i] + frame_times[i + tp - 1]) / 2 for i in range(0, len(frame_times), tp)]


def format_timestamp(seconds: float, style: str = "seconds") -> str:
    """``<3.4 seconds>`` (the released format) or ``<00:00:03.4>`` (hours:minutes:seconds, 0.1 s)."""
    if style == "seconds":
        return f"<{seconds:.1f} seconds>"
    if style == "hms":
        tenths = int(round(seconds * 10))
        h, rem = divmod(tenths, 36000)
        m, rem = divmod(rem, 600)
        return f"<{h:02d}:{m:02d}:{rem // 10:02d}.{rem % 10}>"
    raise ValueError(f"timestamp style {style!r}: use 'seconds' or 'hms'")


def video_smart_resize(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = 4096, max_pixels: int = 25165824) -> tuple[int, int]:
    """Frame size for a clip under a pixel budget over all frames (T*H*W), like HF's video processor.
    Frames smaller than ``factor`` are first scaled up to it."""
    if height <= 0 or width <= 0:
        raise BadSample("zero_size_image", f"video frame of size {width}x{height}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise BadSample("extreme_aspect_ratio", f"video frames {width}x{height} have aspect ratio > 200")
    rounded = round(num_frames / temporal_factor) * temporal_factor
    return fit_pixel_budget(height, width, factor, min_pixels, max_pixels, num_frames, rounded)


@dataclass(frozen=True)
class VideoSettings:
    min_pixels: int = 4096  # budgets over all frames (T*H*W), hub video_preprocessor_config
    max_pixels: int = 25165824
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    cap_pixels_per_frame: bool = False  # qwen-vl-utils' per-frame cap (HF `cap_pixels_per_frame`)
    max_tokens_per_frame: int = 768


@dataclass
class VideoPlan:
    """Everything about a sampled clip that does not need its pixels."""
    height: int  # resized frame size
    width: int
    grid_thw: tuple[int, int, int]
    group_times: list[float]  # seconds, one per temporal patch (len == t)


def plan_video(num_frames: int, height: int, width: int, frame_times: list[float],
               s: VideoSettings = VideoSettings()) -> VideoPlan:
    """Frame size, grid and group times of ``num_frames`` sampled frames of ``height`` x ``width``."""
    if num_frames != len(frame_times) or not num_frames:
        raise ValueError("a video needs one time per frame and at least one frame")
    factor = s.patch_size * s.merge_size
    max_pixels = s.max_pixels
    if s.cap_pixels_per_frame:  # per frame at most max_tokens_per_frame tokens or its share of the budget
        per_frame = max(min(s.max_tokens_per_frame * factor * factor, s.max_pixels // num_frames),
                        int(s.min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    h, w = video_smart_resize(num_frames, height, width, s.temporal_patch_size, factor, s.min_pixels, max_pixels)
    times = group_timestamps(pad_to_multiple(list(frame_times), s.temporal_patch_size), s.temporal_patch_size)
    return VideoPlan(h, w, (len(times), h // s.patch_size, w // s.patch_size), times)


def frames_size(frames: list[Image.Image]) -> tuple[int, int]:
    """The common (height, width) of a clip's frames; frames of different sizes -> BadSample."""
    sizes = {(f.height, f.width) for f in frames}
    if len(sizes) != 1:
        raise BadSample("wrong_type", f"video frames have different sizes {sorted(sizes)}")
    return sizes.pop()


def video_frames(frames: list[Image.Image], frame_times: list[float],
                 s: VideoSettings = VideoSettings()) -> tuple[DecodedFrames, VideoPlan]:
    """Already-sampled RGB frames (and their times in seconds) at the planned size, the last one repeated
    (the same array, not a copy) to fill the temporal patch."""
    plan = plan_video(len(frames), *frames_size(frames), frame_times, s)
    resized = [rgb_frame(f, plan.height, plan.width) for f in frames]
    padded = tuple(resized[i] for i in pad_to_multiple(list(range(len(frames))), s.temporal_patch_size))
    decoded = DecodedFrames(padded, s.patch_size, s.merge_size, s.temporal_patch_size)
    assert decoded.grid == plan.grid_thw
    return decoded, plan


def process_video(frames: list[Image.Image], frame_times: list[float],
                  s: VideoSettings = VideoSettings()) -> tuple[torch.Tensor, VideoPlan]:
    """Already-sampled RGB frames (and their times in seconds) -> (patches [t*h*w, 1536] float32, plan)."""
    decoded, plan = video_frames(frames, frame_times, s)
    return decoded.pixel_values(), plan

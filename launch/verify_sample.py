"""The fixed multimodal sample ``qwen3vl-convert verify`` runs through both implementations.

Two images of different sizes and aspect ratios, a two-group video with its timestamp text, and
text around them, built with our own processing (resize + normalise + patchify, the tokenizer, the
MRoPE walker), the prompt in the transformers 5.x layout (an outer vision_start/vision_end around
the video's timestamped frame groups). Pixels are random but seeded, so every run sees the same
sample. transformers gets ids + mm_token_type_ids + pixels and computes its own positions; our
model gets a ``PackedBatch`` with our positions, so the comparison covers the rope index too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from qwen3vl.data.batch import IGNORE_INDEX, IMAGE, TEXT, VIDEO, PackedBatch
from qwen3vl.data.image_processing import process_image
from qwen3vl.data.rope_index import get_rope_index
from qwen3vl.data.tokenizer import load_tokenizer
from qwen3vl.data.video_processing import VideoSettings, format_timestamp, process_video
from qwen3vl.model.config import Qwen3VLConfig

SEED = 20251122
# Small on purpose: verify checks numerics, not scale. (height, width) in pixels.
IMAGE_SIZES = ((64, 96), (128, 64))
VIDEO_FRAMES, VIDEO_SIZE, VIDEO_FPS = 4, (64, 64), 2.0
PROMPT = ("Two pictures:", " and", " then a clip:", " Describe all three.")


@dataclass
class VerifySample:
    input_ids: torch.Tensor  # [L]
    mm_token_type_ids: torch.Tensor  # [L]
    image_pixels: torch.Tensor  # [Ni, 1536]
    image_grid_thw: torch.Tensor  # [2, 3]
    video_pixels: torch.Tensor  # [Nv, 1536]
    video_grid_thw: torch.Tensor  # [1, 3]

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    def hf_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of transformers' Qwen3-VL forward (batch of one)."""
        return dict(input_ids=self.input_ids[None], mm_token_type_ids=self.mm_token_type_ids[None],
                    attention_mask=torch.ones(1, self.length, dtype=torch.long),
                    pixel_values=self.image_pixels, image_grid_thw=self.image_grid_thw,
                    pixel_values_videos=self.video_pixels, video_grid_thw=self.video_grid_thw)

    def packed_batch(self, config: Qwen3VLConfig, pad_multiple: int = 1) -> PackedBatch:
        """One packed row holding the sample, padded to ``pad_multiple`` (2·CP, ×TP with SP)."""
        L = self.length
        T = -(-L // pad_multiple) * pad_multiple
        positions = get_rope_index(self.input_ids, self.image_grid_thw, self.video_grid_thw,
                                   self.mm_token_type_ids, config.vision.spatial_merge_size)
        labels = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        labels[: L - 1] = self.input_ids[1:]
        return PackedBatch(
            tokens=_pad(self.input_ids, T), labels=labels,
            position_ids=torch.cat([positions, torch.zeros(3, T - L, dtype=torch.long)], 1),
            mm_token_type_ids=_pad(self.mm_token_type_ids, T),
            cu_seqlens=torch.tensor([0, L], dtype=torch.int32),
            cu_seqlens_padded=torch.tensor([0, T], dtype=torch.int32),
            sample_loss_tokens=torch.tensor([L - 1]),
            pixel_values=torch.cat([self.image_pixels, self.video_pixels]),
            grid_thw=torch.cat([self.image_grid_thw, self.video_grid_thw]),
            pad_multiple=pad_multiple)


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([x, torch.zeros(length - x.numel(), dtype=x.dtype)])


def _random_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "RGB")


def build_verify_sample(config: Qwen3VLConfig) -> VerifySample:
    v = config.vision
    factor = v.patch_size * v.spatial_merge_size
    rng = np.random.default_rng(SEED)
    tokenizer = load_tokenizer()
    ids: list[int] = []
    types: list[int] = []

    def text(s: str) -> None:
        # A model with a smaller vocabulary than the tokenizer still gets valid (if meaningless) ids.
        new = [i % config.text.vocab_size for i in tokenizer.encode(s)]
        ids.extend(new)
        types.extend([TEXT] * len(new))

    def visual(token: int, kind: int, count: int) -> None:
        ids.extend([config.vision_start_token_id] + [token] * count + [config.vision_end_token_id])
        types.extend([TEXT] + [kind] * count + [TEXT])

    merge = v.spatial_merge_size**2
    image_pixels, image_grids = [], []
    for words, size in zip(PROMPT, IMAGE_SIZES):
        pixels, grid = process_image(_random_image(rng, size), min_pixels=factor * factor,
                                     max_pixels=size[0] * size[1], patch_size=v.patch_size,
                                     merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
        text(words)
        visual(config.image_token_id, IMAGE, pixels.shape[0] // (grid[0] * merge))
        image_pixels.append(pixels)
        image_grids.append(grid)

    frames = [_random_image(rng, VIDEO_SIZE) for _ in range(VIDEO_FRAMES)]
    settings = VideoSettings(min_pixels=factor * factor, max_pixels=VIDEO_FRAMES * VIDEO_SIZE[0] * VIDEO_SIZE[1],
                             patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                             temporal_patch_size=v.temporal_patch_size)
    video_pixels, video = process_video(frames, [i / VIDEO_FPS for i in range(VIDEO_FRAMES)], settings)
    t, h, w = video.grid_thw
    text(PROMPT[2])
    ids.append(config.vision_start_token_id)  # the outer wrapper transformers 5.x keeps
    types.append(TEXT)
    for seconds in video.group_times:
        text(format_timestamp(seconds))
        visual(config.video_token_id, VIDEO, h * w // merge)
    ids.append(config.vision_end_token_id)
    types.append(TEXT)
    text(PROMPT[3])

    return VerifySample(
        input_ids=torch.tensor(ids), mm_token_type_ids=torch.tensor(types),
        image_pixels=torch.cat(image_pixels), image_grid_thw=torch.tensor(image_grids),
        video_pixels=video_pixels, video_grid_thw=torch.tensor([video.grid_thw]))

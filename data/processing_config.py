"""Settings that turn a sample into tokens and pixels. Defaults are the Qwen3-VL release settings."""
from __future__ import annotations

from dataclasses import dataclass

from qwen3vl.data.video_processing import VideoSettings

TIMESTAMP_FORMATS = ("seconds", "hms", "both")


@dataclass
class ProcessingConfig:
    # Row length of the stage (8K, 32K, 256K): long text documents are cut into chunks of at most this,
    # multimodal samples longer than this are rejected (too_long_multimodal).
    seq_length: int = 8192

    # Images: hub preprocessor_config of Qwen3-VL: 64..16384 tokens of 32x32 pixels.
    min_pixels: int = 65536
    max_pixels: int = 16777216
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2

    # Videos: hub video_preprocessor_config; the pixel budget is over all frames (T*H*W).
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 768
    video_min_pixels: int = 4096
    video_max_pixels: int = 25165824
    # qwen-vl-utils caps the pixels of each frame (HF's `cap_pixels_per_frame`); off in the HF default.
    video_cap_pixels_per_frame: bool = False
    video_max_tokens_per_frame: int = 768
    # "seconds": `<3.4 seconds>` (the only form of the released processor); "hms": `<00:00:03.4>`;
    # "both": one of the two per sample, drawn from (seed, sample key) so it is reproducible on resume.
    timestamp_format: str = "seconds"
    # Keep the outer <|vision_start|>...<|vision_end|> around a video's timestamped frame groups: this is
    # what transformers >= 5 produces from the chat template (see video_processing.video_placeholder).
    video_outer_wrapper: bool = True

    # End text documents, captions, interleaved documents and video captions with <|endoftext|>, as
    # Qwen pretraining data does; conversations end with <|im_end|>\n instead.
    append_eos: bool = True
    seed: int = 0

    @property
    def factor(self) -> int:
        """Pixel granularity of a resize: one merged 2x2 block of 16-pixel patches = 32 pixels."""
        return self.patch_size * self.merge_size

    def video_settings(self) -> VideoSettings:
        return VideoSettings(self.video_min_pixels, self.video_max_pixels, self.patch_size, self.merge_size,
                             self.temporal_patch_size, self.video_cap_pixels_per_frame,
                             self.video_max_tokens_per_frame)

    def validate(self) -> None:
        if self.timestamp_format not in TIMESTAMP_FORMATS:
            raise ValueError(f"timestamp_format={self.timestamp_format!r}; use one of {TIMESTAMP_FORMATS}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if not 0 < self.video_min_pixels <= self.video_max_pixels:
            raise ValueError("need 0 < video_min_pixels <= video_max_pixels")
        if not 1 <= self.video_min_frames <= self.video_max_frames:
            raise ValueError("need 1 <= video_min_frames <= video_max_frames")
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be >= 2, got {self.seq_length}")

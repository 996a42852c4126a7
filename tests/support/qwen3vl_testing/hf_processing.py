"""Transformers' Qwen3-VL processing pieces built offline with the release settings, for parity checks.

Nothing here downloads: the tokenizer is our embedded vocabulary exported as a Hugging Face directory,
the image processor is the PIL-backend ``Qwen2VLImageProcessorPil`` with the hub preprocessor_config
values (the hub's preprocessor_config), and ``get_rope_index`` is called on a stand-in that carries only the merge size.
The video processor is absent: it needs torchvision (not installed on CPU CI).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch


def hf_tokenizer_dir(cache_dir: str) -> str:
    """``<cache_dir>/hf_qwen3vl_tokenizer``, exported on first use (a few seconds) and reused after."""
    from qwen3vl.data.hf_tokenizer_export import export_hf_tokenizer

    path = os.path.join(cache_dir, "hf_qwen3vl_tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        export_hf_tokenizer(path)
    return path


def release_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, resample=3,
                                    size={"shortest_edge": 65536, "longest_edge": 16777216})


def release_processor(hf_tokenizer):
    """``Qwen3VLProcessor`` for text and images (no video processor)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class ImageTextProcessor(Qwen3VLProcessor):
        # The class check resolves the video processor class, which needs torchvision.
        def check_argument_for_proper_class(self, name, arg):
            return None

    return ImageTextProcessor(image_processor=release_image_processor(), tokenizer=hf_tokenizer,
                              video_processor=None)


def hf_rope_index(input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                  video_grid_thw: torch.Tensor | None, spatial_merge_size: int = 2) -> torch.Tensor:
    """[3, L] positions of one sample from transformers' ``Qwen3VLModel.get_rope_index``."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    model = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(
        spatial_merge_size=spatial_merge_size)))
    model.get_vision_position_ids = lambda *a, **k: Qwen3VLModel.get_vision_position_ids(model, *a, **k)
    video = None if video_grid_thw is None else video_grid_thw.clone()  # HF edits it in place
    positions, _ = Qwen3VLModel.get_rope_index(model, input_ids[None], mm_token_type_ids[None], image_grid_thw, video)
    return positions[:, 0]


def hf_video_expansion(grid_thw: torch.Tensor, frame_indices: list[int], total_frames: int, fps: float) -> str:
    """The text transformers' processor puts in place of one ``<|video_pad|>``: per temporal patch
    ``<t seconds><|vision_start|><|video_pad|>...<|vision_end|>``."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    stand_in = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
                               video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
                               vision_end_token="<|vision_end|>",
                               _calculate_timestamps=lambda *a: Qwen3VLProcessor._calculate_timestamps(None, *a))
    metadata = VideoMetadata(total_num_frames=total_frames, fps=fps, frames_indices=list(frame_indices))
    return Qwen3VLProcessor.replace_video_token(stand_in, {"video_grid_thw": grid_thw[None],
                                                           "video_metadata": [metadata]}, 0)

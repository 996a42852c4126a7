"""Video frame sampling, timestamps, sizes and patches as transformers' Qwen3-VL video path."""
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_video_smart_resize
from transformers.video_utils import VideoMetadata

from qwen3vl.data.image_processing import process_image
from qwen3vl.data.sample_format import BadSample
from qwen3vl.data.video_processing import (VideoSettings, format_timestamp, group_timestamps, pad_to_multiple,
                                           process_video, sample_frame_indices, video_smart_resize)


def hf_sample(total: int, fps: float) -> list[int]:
    # The sampling method needs no torchvision; call it on a stand-in holding the release settings.
    settings = SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    metadata = VideoMetadata(total_num_frames=total, fps=fps)
    return Qwen3VLVideoProcessor.sample_frames(settings, metadata).tolist()


@pytest.mark.parametrize("total,fps", [(300, 30.0), (1, 30.0), (3, 24.0), (7, 2.0), (9, 2.0), (100, 25.0),
                                       (50000, 24.0), (123, 29.97), (16, 4.0)])
def test_frame_sampling_matches_transformers(total, fps):
    assert sample_frame_indices(total, fps) == hf_sample(total, fps)


def test_timestamps_match_transformers_and_the_spec_example():
    # 10 s at 30 fps sampled at 2 fps (transformers' Qwen3-VL video processor): <0.3 seconds>, <1.3 seconds>, <2.4 seconds> ...
    indices = sample_frame_indices(300, 30.0)
    times = group_timestamps([i / 30.0 for i in pad_to_multiple(indices)])
    reference = Qwen3VLProcessor._calculate_timestamps(None, list(indices), 30.0, 2)
    assert times == pytest.approx(reference, abs=1e-12)
    assert [format_timestamp(t) for t in times[:3]] == ["<0.3 seconds>", "<1.3 seconds>", "<2.4 seconds>"]
    odd = [0, 10, 20]
    assert group_timestamps([i / 10 for i in pad_to_multiple(odd)]) == \
        pytest.approx(Qwen3VLProcessor._calculate_timestamps(None, list(odd), 10.0, 2))


def test_hms_timestamps():
    assert format_timestamp(3.44, "hms") == "<00:00:03.4>"
    assert format_timestamp(3725.3, "hms") == "<01:02:05.3>"
    assert format_timestamp(59.96, "hms") == "<00:01:00.0>"
    with pytest.raises(ValueError):
        format_timestamp(1.0, "minutes")


def test_video_resize_matches_transformers():
    rng = np.random.default_rng(1)
    for _ in range(300):
        t = int(rng.integers(1, 800))
        h, w = (int(x) for x in rng.integers(8, 4000, 2))
        if max(h, w) / min(h, w) > 100:
            continue
        for lo, hi in ((4096, 25165824), (128 * 32 * 32, 768 * 32 * 32)):
            if t < 2:
                continue
            assert video_smart_resize(t, h, w, 2, 32, lo, hi) == hf_video_smart_resize(t, h, w, 2, 32, lo, hi)


def test_odd_frame_count_repeats_the_last_frame():
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)) for _ in range(5)]
    pixels, plan = process_video(frames, [0.0, 0.5, 1.0, 1.5, 2.0], VideoSettings(max_pixels=64 * 96 * 6))
    t, h, w = plan.grid_thw
    assert (t, h, w) == (3, 4, 6) and pixels.shape == (t * h * w, 1536)
    assert plan.group_times == [0.25, 1.25, 2.0]
    # The last temporal patch holds frame 4 twice; as an image, frame 4 gives the same rows.
    last = pixels[2 * h * w:]
    image_rows, _ = process_image(frames[4], min_pixels=64 * 96, max_pixels=64 * 96)
    np.testing.assert_allclose(last.numpy(), image_rows.numpy(), atol=1e-6)
    first = pixels[:h * w].reshape(h * w, 3, 2, 256)
    assert not np.allclose(first[:, :, 0].numpy(), first[:, :, 1].numpy())


def test_per_frame_cap_limits_short_clips():
    frames = [Image.new("RGB", (640, 480))] * 4
    times = [0.0, 0.5, 1.0, 1.5]
    free, _ = process_video(frames, times, VideoSettings(max_pixels=768 * 32 * 32 * 8))
    capped, plan = process_video(frames, times, VideoSettings(max_pixels=768 * 32 * 32 * 8, cap_pixels_per_frame=True,
                                                              max_tokens_per_frame=64))
    assert plan.grid_thw[1] * plan.grid_thw[2] // 4 <= 64 < free.shape[0] // 2 // 4


def test_frames_of_different_sizes_are_rejected():
    frames = [Image.new("RGB", (64, 64)), Image.new("RGB", (64, 32))]
    with pytest.raises(BadSample) as e:
        process_video(frames, [0.0, 0.5])
    assert e.value.reason == "wrong_type"

"""Images become exactly the patches and grids of the released Qwen3-VL image processor."""
import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from qwen3vl_testing.hf_processing import release_image_processor
from qwen3vl.data.image_processing import decode_image, patchify, process_image, smart_resize
from qwen3vl.data.sample_format import BadSample


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size,expected,tokens", [((480, 640), (480, 640), 300), ((1080, 1920), (1088, 1920), 2040),
                                                  ((64, 96), (224, 320), 70), ((100, 100), (256, 256), 64)])
def test_smart_resize_spec_examples(size, expected, tokens):
    h, w = smart_resize(*size)
    assert (h, w) == expected
    assert h * w // 32 ** 2 == tokens


def test_smart_resize_agrees_with_transformers_on_many_sizes():
    rng = np.random.default_rng(0)
    sizes = [tuple(int(x) for x in rng.integers(1, 6000, 2)) for _ in range(400)]
    sizes += [(1, 150), (33, 6500), (8000, 8000), (31, 31), (5000, 40)]
    checked = 0
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in ((65536, 16777216), (4 * 1024, 1280 * 1024)):
            assert smart_resize(h, w, 32, lo, hi) == hf_smart_resize(h, w, 32, lo, hi), (h, w, lo, hi)
            checked += 1
    assert checked > 700


def test_smart_resize_rejects_what_the_processor_rejects():
    with pytest.raises(BadSample) as e:
        smart_resize(10, 2001)
    assert e.value.reason == "extreme_aspect_ratio"
    with pytest.raises(BadSample) as e:
        smart_resize(0, 10)
    assert e.value.reason == "zero_size_image"


@pytest.mark.parametrize("size,mode", [((480, 640), "RGB"), ((37, 301), "RGB"), ((100, 100), "RGBA"),
                                       ((300, 200), "L"), ((64, 96), "P"), ((90, 1200), "RGB")])
def test_patches_equal_the_release_processor(size, mode):
    rng = np.random.default_rng(sum(size))
    data = encode_png(Image.fromarray(rng.integers(0, 256, (*size, 4), dtype=np.uint8), "RGBA").convert(mode))
    reference = release_image_processor()(images=[Image.open(io.BytesIO(data))], return_tensors="np")
    pixels, grid = process_image(decode_image(data))
    assert [list(grid)] == reference["image_grid_thw"].tolist()
    assert pixels.dtype.is_floating_point and tuple(pixels.shape) == reference["pixel_values"].shape
    np.testing.assert_array_equal(pixels.numpy(), reference["pixel_values"])  # bit for bit


def test_patch_rows_are_block_major_and_channel_time_row_col():
    # Pixel value encodes its coordinates, so each flattened row can be decoded back.
    T, C, H, W = 2, 3, 64, 96
    t, c, y, x = np.meshgrid(np.arange(T), np.arange(C), np.arange(H), np.arange(W), indexing="ij")
    frames = (t * 1_000_000 + c * 100_000 + y * 1000 + x).astype(np.float64)
    patches, grid = patchify(frames, patch_size=16, merge_size=2, temporal_patch_size=2)
    assert grid == (1, 4, 6)
    row = 0
    for block_row in range(2):
        for block_col in range(3):
            for r in range(2):
                for col in range(2):
                    ph, pw = block_row * 2 + r, block_col * 2 + col
                    vec = patches[row].numpy().reshape(C, 2, 16, 16)
                    expected = frames[:, :, ph * 16:(ph + 1) * 16, pw * 16:(pw + 1) * 16].transpose(1, 0, 2, 3)
                    np.testing.assert_array_equal(vec, expected)
                    row += 1


def test_bad_image_bytes_raise_stable_reasons(monkeypatch):
    good = encode_png(Image.new("RGB", (40, 30), (1, 2, 3)))
    with pytest.raises(BadSample) as e:
        decode_image(b"definitely not an image")
    assert e.value.reason == "corrupt_image"
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    with pytest.raises(BadSample) as e:
        decode_image(jpeg.getvalue()[:2000])
    assert e.value.reason in ("truncated", "corrupt_image")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadSample) as e:
        decode_image(good)
    assert e.value.reason == "image_too_large"

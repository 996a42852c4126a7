"""SampleEncoder: tokens, types, pixels and positions equal transformers' Qwen3-VL processor; labels train
on the right tokens; long text is cut, long multimodal samples refused; bad content raises BadSample."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from qwen3vl.data.batch import IGNORE_INDEX, TEXT, VIDEO
from qwen3vl.data.encode import SampleEncoder
from qwen3vl_testing.hf_processing import hf_rope_index, hf_tokenizer_dir, hf_video_expansion, release_processor
from qwen3vl.data.processing_config import ProcessingConfig
from qwen3vl.data.sample_format import BadSample, RawSample
from qwen3vl.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    # The exported tokenizer directory is shared with test_tokenizer through the session's base temp dir.
    return release_processor(load_tokenizer(hf_tokenizer_dir(str(tmp_path_factory.getbasetemp()))).hf_tokenizer)


@pytest.fixture(scope="module")
def encoder():
    return SampleEncoder(cfg=ProcessingConfig(seq_length=8192))


def png(h, w, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def assert_matches_processor(sample, out):
    assert torch.equal(sample.tokens, out["input_ids"][0])
    assert torch.equal(sample.mm_token_type_ids, out["mm_token_type_ids"][0].long())
    assert torch.equal(sample.grid_thw, out["image_grid_thw"])
    assert torch.equal(sample.pixel_values, out["pixel_values"])  # bit for bit
    expected = hf_rope_index(out["input_ids"][0], out["mm_token_type_ids"][0], out["image_grid_thw"], None)
    assert torch.equal(sample.position_ids, expected)


def loss_text(encoder, sample) -> str:
    return encoder.tokenizer.decode([t for t in sample.labels.tolist() if t != IGNORE_INDEX])


def assert_labels_are_next_tokens(sample):
    labels, tokens = sample.labels, sample.tokens
    assert labels[-1] == IGNORE_INDEX
    kept = labels[:-1] != IGNORE_INDEX
    assert torch.equal(labels[:-1][kept], tokens[1:][kept])


def test_conversation_with_images_equals_the_processor(hf, encoder):
    a, b = png(64, 96, 1), png(100, 37, 2)
    raw = RawSample("k", "s", {"kind": "conversation", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"image": "a.png"}, {"text": "What is this?"}, {"image": "b.png"}]},
        {"role": "assistant", "content": "A cat."}]}, {"a.png": a, "b.png": b})
    (sample,) = encoder.encode(raw)
    prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
              "<|vision_end|>What is this?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
              "<|im_start|>assistant\nA cat.<|im_end|>\n")
    images = [Image.open(io.BytesIO(x)) for x in (a, b)]
    assert_matches_processor(sample, hf(text=[prompt], images=images, return_tensors="pt"))
    assert loss_text(encoder, sample) == "A cat.<|im_end|>\n"
    assert_labels_are_next_tokens(sample)
    sample.validate()


def test_caption_and_interleaved_equal_the_processor_and_train_on_text_only(hf, encoder):
    img = png(480, 640, 3)
    (caption,) = encoder.encode(RawSample("c", "s", {"kind": "caption", "image": "0.png", "text": "A red cat."},
                                          {"0.png": img}))
    out = hf(text=["<|vision_start|><|image_pad|><|vision_end|>A red cat.<|endoftext|>"],
             images=[Image.open(io.BytesIO(img))], return_tensors="pt")
    assert_matches_processor(caption, out)
    assert loss_text(encoder, caption) == "A red cat."  # predicted from the image, EOS untrained
    doc = {"kind": "interleaved", "content": [{"text": "Before. "}, {"image": "0.png"}, {"text": "After."}]}
    (inter,) = encoder.encode(RawSample("i", "s", doc, {"0.png": img}))
    out = hf(text=["Before. <|vision_start|><|image_pad|><|vision_end|>After.<|endoftext|>"],
             images=[Image.open(io.BytesIO(img))], return_tensors="pt")
    assert_matches_processor(inter, out)
    assert loss_text(encoder, inter) == ". After."  # the very first token has no context to predict it from
    loss_ids = inter.labels[inter.labels != IGNORE_INDEX]
    assert not ({151643, 151652, 151653, 151655} & set(loss_ids.tolist()))
    for s in (caption, inter):
        assert_labels_are_next_tokens(s)


def video_sample(encoder, n_frames, fps, key="v", **cfg):
    enc = SampleEncoder(encoder.tokenizer, ProcessingConfig(**cfg)) if cfg else encoder
    media = {f"f{i}.png": png(64, 96, i) for i in range(n_frames)}
    meta = {"kind": "video", "video": {"frames": sorted(media, key=lambda n: int(n[1:-4])), "fps": fps},
            "text": "It moves."}
    (sample,) = enc.encode(RawSample(key, "s", meta, media))
    return sample


@pytest.mark.parametrize("n_frames,fps", [(40, 30.0), (9, 2.0)])
def test_video_prompt_equals_the_transformers5_expansion(hf, encoder, n_frames, fps):
    sample = video_sample(encoder, n_frames, fps)
    indices = np.linspace(0, n_frames - 1, max(4, min(int(n_frames / fps * 2), n_frames))).round().astype(int)
    expansion = hf_video_expansion(sample.grid_thw[0], indices.tolist(), n_frames, fps)
    # transformers 5 replaces only <|video_pad|> of the template's <|vision_start|><|video_pad|><|vision_end|>.
    prompt = "<|vision_start|>" + expansion + "<|vision_end|>It moves.<|endoftext|>"
    ids = torch.tensor(hf.tokenizer.encode(prompt, add_special_tokens=False))
    assert torch.equal(sample.tokens, ids)
    types = torch.where(ids == 151656, VIDEO, TEXT)
    assert torch.equal(sample.mm_token_type_ids, types)
    assert torch.equal(sample.position_ids, hf_rope_index(ids, types, None, sample.grid_thw))
    assert sample.grid_thw[0, 0] == (len(indices) + 1) // 2
    assert loss_text(encoder, sample) == "It moves."
    sample.validate()


def test_video_without_outer_wrapper_and_hms_timestamps(encoder):
    wrapped = video_sample(encoder, 9, 2.0)
    bare = video_sample(encoder, 9, 2.0, video_outer_wrapper=False, timestamp_format="hms")
    text = encoder.tokenizer.decode(bare.tokens.tolist())
    assert text.startswith("<00:00:00.2><|vision_start|><|video_pad|>")
    assert encoder.tokenizer.decode(wrapped.tokens.tolist()).startswith("<|vision_start|><0.2 seconds><|vision_start|>")
    assert torch.equal(bare.pixel_values, wrapped.pixel_values)


def test_both_timestamp_formats_are_drawn_per_sample_reproducibly(encoder):
    enc = SampleEncoder(encoder.tokenizer, ProcessingConfig(timestamp_format="both", seed=3))
    styles = [enc._timestamp_style(f"key{i}") for i in range(40)]
    assert set(styles) == {"seconds", "hms"}
    assert styles == [enc._timestamp_style(f"key{i}") for i in range(40)]


def test_text_document_trains_on_every_token_and_long_text_is_cut(encoder):
    enc = SampleEncoder(encoder.tokenizer, ProcessingConfig(seq_length=64))
    text = " ".join(f"word{i}" for i in range(200))
    chunks = enc.encode(RawSample("t", "s", {"kind": "text", "text": text}))
    full = encoder.tokenizer.encode(text) + [151643]
    assert len(chunks) == -(-len(full) // 64) and all(c.length <= 64 for c in chunks)
    assert torch.cat([c.tokens for c in chunks]).tolist() == full
    for c in chunks:
        assert torch.equal(c.labels[:-1], c.tokens[1:]) and c.labels[-1] == IGNORE_INDEX
        assert torch.equal(c.position_ids, torch.arange(c.length).expand(3, -1))


def test_multimodal_sample_longer_than_a_row_is_refused_before_decoding_pixels(encoder):
    enc = SampleEncoder(encoder.tokenizer, ProcessingConfig(seq_length=64))
    header_only = png(64, 64)[:100]  # a valid PNG header (size known) whose pixel data is cut off
    with pytest.raises(BadSample) as e:
        enc.encode(RawSample("m", "s", {"kind": "caption", "image": "0.png", "text": "x"}, {"0.png": header_only}))
    assert e.value.reason == "too_long_multimodal"
    with pytest.raises(BadSample) as e:  # when it fits, decoding the pixels finds the damage
        encoder.encode(RawSample("m", "s", {"kind": "caption", "image": "0.png", "text": "x"},
                                 {"0.png": header_only}))
    assert e.value.reason in ("truncated", "corrupt_image")


@pytest.mark.parametrize("meta,media,reason", [
    ({"text": "no kind"}, {}, "missing_field"),
    ({"kind": "poem", "text": "x"}, {}, "wrong_type"),
    ({"kind": "text", "text": "   "}, {}, "empty_text"),
    ({"kind": "text", "text": 5}, {}, "wrong_type"),
    ({"kind": "caption", "image": "1.png", "text": "x"}, {"0.png": b""}, "unknown_media"),
    ({"kind": "caption", "image": "0.png", "text": "x"}, {"0.png": b"GIF89a garbage"}, "corrupt_image"),
    ({"kind": "conversation", "messages": [{"role": "user", "content": "hi"}]}, {}, "no_loss_tokens"),
    ({"kind": "conversation", "messages": [{"role": "bot", "content": "hi"}]}, {}, "wrong_type"),
    ({"kind": "video", "video": {"frames": ["0.png"]}, "text": "x"}, {"0.png": b""}, "missing_field"),
])
def test_bad_content_raises_a_stable_reason(encoder, meta, media, reason):
    with pytest.raises(BadSample) as e:
        encoder.encode(RawSample("bad", "shard-0", meta, media))
    assert e.value.reason == reason
    assert "bad" in str(e.value) and "shard-0" in str(e.value) or reason == "corrupt_image"

"""The embedded Qwen3-VL tokenizer gives the released ids; a Hugging Face directory gives the same."""
import unicodedata

import pytest

from qwen3vl_testing.hf_processing import hf_tokenizer_dir
from qwen3vl.data.tokenizer import ADDED_TOKENS, HFTokenizer, load_tokenizer

CORPUS = [
    "Hello world",
    "def f(x):\n\treturn x ** 2  # square\n\n\n",
    "你好，世界！Qwen3-VL 看图说话。",
    "It's 12345 o'clock, isn't it?  Trailing   spaces   ",
    "emoji 🙂👍🏽 and accents: café naïve e\u0301",
    "<|image_pad|> written in a caption stays text",
    "\u00a0non-breaking\u2003em-space\r\nCRLF",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_known_qwen_ids(tok):
    # Ids measured with the Qwen2/2.5/3 tokenizers (docs/tokenizer.md).
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tok.encode("你好，世界") == [108386, 3837, 99489]
    assert tok.encode("assistant") == [77091]  # qwen-vl-finetune finds answers by this id


def test_added_tokens_sit_at_qwen3vl_ids(tok):
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
                "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<think>": 151667, "</think>": 151668}
    for name, token_id in expected.items():
        assert tok.token_id(name) == token_id
    for offset, name in enumerate(ADDED_TOKENS):
        assert tok.encode(name, allow_special=True) == [151643 + offset]
        assert tok.decode([151643 + offset]) == name
    assert tok.vocab_size == 151669


def test_data_text_never_becomes_a_special_token(tok):
    ids = tok.encode("look: <|image_pad|><|im_end|>")
    assert max(ids) < 151643
    assert tok.decode(ids) == "look: <|image_pad|><|im_end|>"


def test_nfc_normalisation_before_bpe(tok):
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")


@pytest.mark.parametrize("text", CORPUS)
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_offsets_point_at_token_starts(tok):
    text = "assistant\nA cat sat."
    ids, offsets = tok.encode_with_offsets(text)
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for i, start in enumerate(offsets):
        assert text[start:].startswith(tok.decode([ids[i]]))


def test_hugging_face_directory_gives_the_same_ids(tmp_path_factory):
    # Exported once into the session's base temp dir; test_encode reuses it.
    hf = load_tokenizer(hf_tokenizer_dir(str(tmp_path_factory.getbasetemp())))
    assert isinstance(hf, HFTokenizer)
    embedded = load_tokenizer()
    for text in CORPUS:
        assert hf.encode(text) == embedded.encode(text)
        nfc = unicodedata.normalize("NFC", text)
        assert hf.encode_with_offsets(nfc) == embedded.encode_with_offsets(nfc)
    assert hf.encode("<|im_start|>user\n<think>", allow_special=True) == [151644, 872, 198, 151667]
    assert hf.token_id("<|video_pad|>") == 151656


def test_missing_tokenizer_path_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="Hugging Face tokenizer directory"):
        load_tokenizer(str(tmp_path / "nope"))

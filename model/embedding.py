"""Token embedding of the LLM: a vocab-parallel table (rows split over tensor-parallel ranks).

Kept apart from megatron's ``LanguageModelEmbedding`` because vision features must replace rows at the
visual positions *before* the sequence-parallel scatter, which that class does internally. The attribute
name ``word_embeddings`` is what megatron's ``LanguageModule`` uses for tied output weights.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule


class TokenEmbedding(MegatronModule):
    def __init__(self, config: TransformerConfig, vocab_size: int) -> None:
        super().__init__(config=config)
        self.word_embeddings = VocabParallelEmbedding(
            num_embeddings=vocab_size, embedding_dim=config.hidden_size, init_method=config.init_method,
            reduce_scatter_embeddings=False, config=config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, H] (all-reduced over tensor-parallel ranks: every rank holds the full row)."""
        return self.word_embeddings(input_ids)

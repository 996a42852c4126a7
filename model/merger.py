"""Patch mergers: 2x2 blocks of ViT patches -> one LLM token.

``PatchMerger`` (the final merger, ``postshuffle_norm=False``) normalises each patch over D, concatenates the
4 patches of a block (consecutive rows, since patches are block-major) into 4·D, then fc1 (4D -> 4D, bias),
exact-erf GELU, fc2 (4D -> LLM hidden, bias). The three DeepStack mergers (``postshuffle_norm=True``) are the
same MLP with the LayerNorm taken over 4·D *after* the concatenation. fc1 is column-parallel and fc2
row-parallel, so under tensor parallelism each rank holds a slice of the 4·D intermediate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from qwen3vl.model.norms import LayerNorm


class PatchMerger(MegatronModule):
    def __init__(self, config: TransformerConfig, hidden_size: int, out_hidden_size: int, merge: int,
                 postshuffle_norm: bool, eps: float = 1e-6) -> None:
        super().__init__(config=config)
        self.merged = hidden_size * merge * merge
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(config, self.merged if postshuffle_norm else hidden_size, eps=eps)
        self.linear_fc1 = ColumnParallelLinear(self.merged, self.merged, config=config, init_method=config.init_method,
                                               bias=True, gather_output=False, skip_bias_add=False)
        self.linear_fc2 = RowParallelLinear(self.merged, out_hidden_size, config=config,
                                            init_method=config.output_layer_init_method, bias=True,
                                            input_is_parallel=True, skip_bias_add=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, D] patch features (block-major) -> [N/4, out_hidden_size]."""
        if self.postshuffle_norm:
            x = self.norm(patches.reshape(-1, self.merged))
        else:
            x = self.norm(patches).reshape(-1, self.merged)
        x, _ = self.linear_fc1(x.unsqueeze(1))  # megatron linears take [s, b, h]
        x, _ = self.linear_fc2(F.gelu(x))
        return x.squeeze(1)

"""DeepStack: visual features from intermediate ViT blocks added to the LLM's hidden states.

After LLM decoder layer j (j = 0, 1, 2) the j-th DeepStack merger's output is added at the visual
positions. The features ride through megatron's ``TransformerBlock`` in the layer's otherwise unused
``context`` argument (self-attention-only layers ignore it), as one tensor ``[J, T_local, 1, H]`` holding
zeros at text positions. That keeps them correct under activation recompute and under pipeline schedules
with several micro-batches in flight, where state stored on a module would be overwritten.
"""
from __future__ import annotations

from typing import Any

import torch
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
from megatron.core.transformer.transformer_layer import TransformerLayer


class DeepStackTransformerLayer(TransformerLayer):
    """A megatron TransformerLayer that adds ``context[layer index]`` to its output when given."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, context: torch.Tensor | None = None,
                **kwargs: Any):
        output, _ = super().forward(hidden_states, *args, context=None, **kwargs)
        index = self.layer_number - 1  # global 0-based layer index (layer_number includes the PP offset)
        if context is not None and index < context.shape[0]:
            output = output + context[index]
        return output, context


def deepstack_context(features: list[torch.Tensor], positions: torch.Tensor, seq_len: int,
                      sequence_parallel: bool) -> torch.Tensor | None:
    """[J, T(/TP), 1, H] DeepStack addends: feature rows placed at ``positions`` of a zero row.

    ``features``: J tensors [n_local_visual, H] ordered like ``positions`` (local row indices).
    Under sequence parallelism each TP rank keeps its own slice of the sequence.
    """
    if not features:
        return None
    stacked = torch.stack(features)  # [J, n, H]
    dense = stacked.new_zeros(stacked.shape[0], seq_len, stacked.shape[-1])
    dense = dense.index_copy(1, positions, stacked)
    dense = dense.transpose(0, 1)  # [T, J, H]: megatron scatters along dim 0
    if sequence_parallel:
        dense = scatter_to_sequence_parallel_region(dense)
    return dense.transpose(0, 1).unsqueeze(2).contiguous()

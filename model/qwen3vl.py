"""The Qwen3-VL model on megatron-core: one pipeline stage (or the whole model) of it.

First stage (``pre_process``): token embedding, the vision tower and mergers; merged visual features
replace the embeddings at visual positions, and the DeepStack features go to LLM layers 0, 1, 2 (all on
this stage). Every stage: interleaved MRoPE from the 3-row position ids (each stage gets them), the
stage's Qwen3 decoder layers. Last stage (``post_process``): final RMSNorm, vocab-parallel output layer
(tied to the embedding for 2B/4B), and per-token vocab-parallel cross entropy when labels are given.

Input contract (one packed THD row, context-parallel local: ``qwen3vl.parallel.micro_batch.MicroBatch
.model_kwargs()``): input_ids [T], position_ids [3, T], packed_seq_params (global cu_seqlens),
pixel_values [N, 1536] and grid_thw [M, 3] of the *whole* row's media, visual_index [T] (k for the row's
k-th visual token, -1 for text), labels [T] or None, gather_index [T] (the global row of each local row).
Returns the per-token loss [T] fp32 (0 where the label
is IGNORE_INDEX; only labelled rows are projected onto the vocabulary) when labels are given, else the logits [T, vocab / TP] (this rank's vocabulary slice);
stages other than the last return their output hidden states for the pipeline schedule.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlock

from qwen3vl.data.batch import IGNORE_INDEX
from qwen3vl.model.config import Qwen3VLConfig
from qwen3vl.model.deepstack import deepstack_context
from qwen3vl.model.embedding import TokenEmbedding
from qwen3vl.model.llm_spec import qwen3_block_spec
from qwen3vl.model.mrope import InterleavedMRoPE
from qwen3vl.model.padding import moe_padding_mask
from qwen3vl.model.vision_encoder import VisionEncoder
from qwen3vl.parallel.context_parallel import encode_vision_across_cp


class Qwen3VLModel(LanguageModule):
    def __init__(self, config: Qwen3VLConfig, transformer_config: TransformerConfig,
                 vision_transformer_config: Optional[TransformerConfig] = None, pre_process: bool = True,
                 post_process: bool = True, vp_stage: Optional[int] = None, attention_backend: str = "auto") -> None:
        super().__init__(config=transformer_config)
        if pre_process and vision_transformer_config is None:
            raise ValueError("the first pipeline stage builds the vision tower: pass vision_transformer_config")
        self.model_config = config
        self.model_type = ModelType.encoder_or_decoder  # what megatron's pipeline schedules look up
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = config.tie_word_embeddings
        text = config.text
        if pre_process:
            self.embedding = TokenEmbedding(transformer_config, text.vocab_size)
            self.vision = VisionEncoder(config.vision, vision_transformer_config, attention_backend)
        self.rotary = InterleavedMRoPE(text.head_dim, text.rope_theta, text.mrope_section)
        self.decoder = TransformerBlock(
            transformer_config, qwen3_block_spec(config, transformer_config, vp_stage, attention_backend),
            pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                text.hidden_size, text.vocab_size, config=transformer_config, init_method=transformer_config.init_method,
                bias=False, skip_bias_add=False, gather_output=False,
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights)
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's output here (a list of one tensor)."""
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "Qwen3VLModel takes one input tensor per stage"
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    # --- first stage --------------------------------------------------------------------------------
    def _encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, device: torch.device):
        # The pixels may still be on the host (MicroBatch.to(media=False)): the tower's input goes to
        # ``device`` here, under CP only this rank's share of the row's media.
        def encode(pixels: torch.Tensor, grid: torch.Tensor):
            return self.vision(pixels.to(device, non_blocking=True), grid)

        if parallel_state.get_context_parallel_world_size() > 1:
            return encode_vision_across_cp(encode, pixel_values, grid_thw,
                                           spatial_merge_size=self.model_config.vision.spatial_merge_size,
                                           on_idle=lambda: self._vision_keepalive(grid_thw.device))
        return encode(pixel_values, grid_thw)

    def _vision_keepalive(self, device: torch.device) -> Optional[torch.Tensor]:
        """A zero that depends on every trainable parameter of the vision tower and its mergers (None when
        none trains, or without autograd).

        megatron's overlapped gradient reduction (``parallel.overlap_grad_reduce``, the GPU default) launches a
        bucket's reduce once every parameter in it has had its gradient on a step's last micro-batch, and
        asserts that each one has. A row without media, or a CP rank whose share of the row's media is
        empty, would leave the tower's parameters without a gradient. Such a micro-batch runs the tower on
        one dummy 1-frame image of merge x merge patches, and the caller adds 0 · its outputs to the
        activations: every tower parameter gets an exact zero gradient; the loss and the other gradients
        are unchanged.
        """
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in self.vision.parameters()):
            return None
        v = self.model_config.vision
        side = v.spatial_merge_size
        grid = torch.tensor([[1, side, side]], dtype=torch.long, device=device)
        merged, deepstack = self.vision(torch.zeros(side * side, v.patch_dim, device=device), grid)
        return sum(x.sum() for x in (merged, *deepstack)) * 0.0

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor], grid_thw: Optional[torch.Tensor],
              visual_index: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Decoder input [T(/TP), 1, H] and the DeepStack context [J, T(/TP), 1, H] (None without media)."""
        hidden = self.embedding(input_ids)  # [T, H]
        context = None
        if grid_thw is not None and grid_thw.numel() > 0:
            if visual_index is None:
                raise ValueError("pixel_values given without visual_index (the ordinal of each visual token; "
                                 "see qwen3vl.parallel.micro_batch.MicroBatch)")
            features, deepstack = self._encode_vision(pixel_values, grid_thw, input_ids.device)
            positions = torch.nonzero(visual_index >= 0).squeeze(1)
            ordinals = visual_index[positions]
            hidden = hidden.index_copy(0, positions, features[ordinals].to(hidden.dtype))
            context = deepstack_context([d[ordinals].to(hidden.dtype) for d in deepstack], positions,
                                        hidden.shape[0], self.config.sequence_parallel)
        else:
            keepalive = self._vision_keepalive(input_ids.device)
            if keepalive is not None:
                hidden = hidden + keepalive.to(hidden.dtype)
        hidden = hidden.unsqueeze(1)  # [T, 1, H]: megatron's [s, b, h] with the THD dummy batch
        if self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        return hidden, context

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                packed_seq_params: Optional[PackedSeqParams] = None, pixel_values: Optional[torch.Tensor] = None,
                grid_thw: Optional[torch.Tensor] = None, visual_index: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, gather_index: Optional[torch.Tensor] = None,
                decoder_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        """See the module docstring. ``gather_index`` (global row of each local row) lets MoE routers leave
        padding out of the load-balancing loss."""
        cos_sin = self.rotary(position_ids)
        context = None
        if self.pre_process and decoder_input is None:
            decoder_input, context = self.embed(input_ids, pixel_values, grid_thw, visual_index)
        padding = None
        if self.model_config.is_moe and packed_seq_params is not None:
            padding = moe_padding_mask(packed_seq_params, input_ids.shape[0], gather_index,
                                       self.config.sequence_parallel)
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=None, context=context,
                              rotary_pos_emb=cos_sin, packed_seq_params=packed_seq_params, padding_mask=padding)
        if not self.post_process:
            return hidden
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        if labels is None:
            logits, _ = self.output_layer(hidden, weight=weight)  # [T, 1, V/TP]
            return logits.squeeze(1)
        return self._token_loss(hidden, labels, weight)

    def _token_loss(self, hidden: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
        """The per-token loss [T] fp32, 0 where the label is IGNORE_INDEX.

        Only the rows with a label go through the output layer and the cross entropy: visual tokens, prompts
        and padding have none, and the vocabulary projection (151,936 columns) is most of a small model's
        step and, in fp32 logits, most of a large one's activation memory at 8K+ tokens. Every TP rank
        holds the same labels, so each selects the same rows.
        """
        ignored = labels == IGNORE_INDEX
        if self.config.sequence_parallel:
            return self._sequence_parallel_token_loss(hidden, labels, ignored, weight)
        keep = torch.nonzero(~ignored).squeeze(1)
        logits, _ = self.output_layer(hidden.index_select(0, keep), weight=weight)  # [K, 1, V/TP]
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels[keep].unsqueeze(1)).squeeze(1).float()
        return torch.zeros(labels.shape, dtype=torch.float32, device=labels.device).index_copy(0, keep, loss)

    def _sequence_parallel_token_loss(self, hidden: torch.Tensor, labels: torch.Tensor, ignored: torch.Tensor,
                                      weight: Optional[torch.Tensor]) -> torch.Tensor:
        """``_token_loss`` when each TP rank holds a contiguous 1/TP share of the rows (``hidden`` [T/TP, 1, H])
        and the output layer all-gathers the shares (its backward reduce-scatters them).

        The gather needs equal shares, so every rank sends the same number of rows: the largest count of
        labelled rows in any share (K). Each rank sends its labelled rows, in order, then as many of its
        unlabelled ones as make up K, whose loss is masked to 0 (so their gradient is too). The labels are
        the same on every TP rank, so each rank works out every share's selection without communicating.
        """
        tp = self.output_layer.tp_group.size()
        share = hidden.shape[0]
        if labels.shape[0] != share * tp:
            raise ValueError(f"sequence parallelism: labels of {labels.shape[0]} rows for {tp} shares of "
                             f"{share} rows")
        labelled = ~ignored.view(tp, share)
        counts = labelled.sum(1)
        k = max(1, int(counts.max()))  # at least one row, so that an all-picture micro-batch still gathers
        # Per share, its labelled rows first in their order (a stable sort), then unlabelled ones.
        order = torch.sort((~labelled).to(torch.uint8), dim=1, stable=True).indices[:, :k]  # [TP, K]
        valid = (torch.arange(k, device=labels.device) < counts.unsqueeze(1)).reshape(-1)  # [TP*K]
        rows = (order + share * torch.arange(tp, device=labels.device).unsqueeze(1)).reshape(-1)  # [TP*K]
        mine = order[self.output_layer.tp_group.rank()]
        logits, _ = self.output_layer(hidden.index_select(0, mine), weight=weight)  # [TP*K, 1, V/TP]
        target = labels.index_select(0, rows).masked_fill(~valid, 0)
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, target.unsqueeze(1)).squeeze(1).float()
        # ``rows`` are distinct, and those not valid are unlabelled rows, whose loss is 0 anyway.
        return torch.zeros(labels.shape, dtype=torch.float32, device=labels.device).index_copy(
            0, rows, loss.masked_fill(~valid, 0.0))

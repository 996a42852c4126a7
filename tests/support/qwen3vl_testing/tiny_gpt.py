"""A tiny megatron-core GPT and a 3-step training run, to check that parallel layouts train identically.

The parity check: train the same initial weights on the same global batch once on a single rank with
plain PyTorch (``train_reference``) and once under a parallel layout with megatron's schedules, DDP and
the ZeRO-1 optimizer (``train_parallel``); fp32 losses must agree to rounding. Initial weights move
between the two through a megatron dist checkpoint (``save_initial_weights``/``load_weights``), which
reshards them for any TP/PP/EP layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer import TransformerConfig

from qwen3vl.parallel.groups import initialize_parallel
from qwen3vl.parallel.layout import ParallelLayout
from qwen3vl.parallel.schedules import forward_backward_func
from qwen3vl.parallel.zero1 import wrap_for_training


@dataclass(frozen=True)
class TinyGPT:
    """Sizes of the test model and of its training run."""

    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 128
    vocab_size: int = 128
    seq_length: int = 32
    num_experts: Optional[int] = None  # MoE with top-2 routing and the alltoall dispatcher when set
    micro_batch_size: int = 2
    global_microbatches: int = 4  # micro-batches per step over all data-parallel ranks
    steps: int = 3
    lr: float = 1e-2  # large enough that 3 Adam steps move the loss well above rounding
    seed: int = 1234
    bf16: bool = False  # bf16 weights and activations, fp32 main weights in the optimizer (train_parallel only)


def _dtype(model: TinyGPT) -> torch.dtype:
    return torch.bfloat16 if model.bf16 else torch.float32


def transformer_config(model: TinyGPT, layout: ParallelLayout) -> TransformerConfig:
    moe = {}
    if model.num_experts:
        moe = dict(num_moe_experts=model.num_experts, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                   moe_ffn_hidden_size=model.ffn_hidden_size, moe_aux_loss_coeff=0.0,
                   moe_router_load_balancing_type="none")
    return TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size, kv_channels=model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, qk_layernorm=True, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp, context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sequence_parallel,
        use_cpu_initialization=True, params_dtype=_dtype(model), bf16=model.bf16, fp16=False,
        pipeline_dtype=_dtype(model), init_method_std=0.02, **moe,
    )


def build_chunks(model: TinyGPT, layout: ParallelLayout) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage); parallel state must be initialised."""
    config = transformer_config(model, layout)
    spec = get_gpt_layer_local_spec(num_experts=model.num_experts, qk_layernorm=True, normalization="RMSNorm")
    chunks = []
    for vp_stage in range(layout.vpp or 1):
        vp = vp_stage if layout.vpp else None
        chunks.append(GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=model.vocab_size,
            max_sequence_length=model.seq_length, position_embedding_type="rope",
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            vp_stage=vp))
    return chunks


def sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """One entry per chunk, as megatron's training names them; tensors carry global (layout-free) keys."""
    return {f"model{index}": chunk.sharded_state_dict() for index, chunk in enumerate(chunks)}


def save_weights(chunks: list[torch.nn.Module], directory: str) -> None:
    """Collective: write this layout's weights as one resharding-capable dist checkpoint."""
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(sharded_state_dict(chunks), directory)


def load_weights(chunks: list[torch.nn.Module], directory: str) -> None:
    """Collective: read a dist checkpoint written under any layout into this layout's chunks."""
    state = dist_checkpointing.load(sharded_state_dict(chunks), directory)
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"model{index}"])


def global_batch(model: TinyGPT, step: int) -> dict[str, torch.Tensor]:
    """The step's whole batch (all micro-batches of all DP ranks), identical on every rank.

    Each row counts up from a random start by a random stride (mod vocab): fresh rows every step that
    a model can still learn within a few steps, so the losses move well above rounding.
    """
    generator = torch.Generator().manual_seed(model.seed + step)
    rows = model.global_microbatches * model.micro_batch_size
    start = torch.randint(0, model.vocab_size, (rows, 1), generator=generator)
    stride = torch.randint(1, 4, (rows, 1), generator=generator)
    tokens = (start + stride * torch.arange(model.seq_length + 1)) % model.vocab_size
    positions = torch.arange(model.seq_length).expand(rows, -1)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "position_ids": positions}


def _micro_batches(model: TinyGPT, batch: dict[str, torch.Tensor], dp_rank: int, dp: int) -> list[dict]:
    per_rank = model.global_microbatches // dp
    size = model.micro_batch_size
    first = dp_rank * per_rank
    return [{k: v[(first + i) * size:(first + i + 1) * size] for k, v in batch.items()} for i in range(per_rank)]


def _forward(gpt: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token losses [b, s] on the last stage, hidden states elsewhere."""
    return gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])


def adam_config(model: TinyGPT) -> OptimizerConfig:
    """Megatron's Adam with the reference run's hyper-parameters (torch.optim.Adam, no weight decay)."""
    return OptimizerConfig(optimizer="adam", lr=model.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                           adam_eps=1e-8, bf16=model.bf16, fp16=False, params_dtype=_dtype(model),
                           use_distributed_optimizer=True,
                           clip_grad=1e6)  # never clips, but makes megatron report the global gradient norm


def train_reference(model: TinyGPT, initial_weights: str) -> list[tuple[float, float]]:
    """Single-rank fp32 training with plain PyTorch: (loss, gradient norm) per step.

    No collectives; needs a tp1/pp1 parallel state (the model is built with megatron's layers).
    """
    if model.bf16:
        raise ValueError("the reference run is fp32: pass TinyGPT(bf16=False)")
    layout = ParallelLayout()
    gpt = build_chunks(model, layout)[0]
    load_weights([gpt], initial_weights)
    optimizer = torch.optim.Adam(gpt.parameters(), lr=model.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses = []
    for step in range(model.steps):
        batch = global_batch(model, step)
        micro = _micro_batches(model, batch, 0, 1)
        optimizer.zero_grad()
        loss = torch.stack([_forward(gpt, mb).float().mean() for mb in micro]).mean()
        loss.backward()
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in gpt.parameters()]))
        optimizer.step()
        losses.append((loss.item(), grad_norm.item()))
    return losses


def train_parallel(model: TinyGPT, layout: ParallelLayout, initial_weights: str
                   ) -> Optional[list[tuple[float, float]]]:
    """Train under ``layout`` with megatron's schedules, DDP and ZeRO-1.

    Returns (loss, gradient norm) per step on last-pipeline-stage ranks, None on the others.
    """
    initialize_parallel(layout, seed=model.seed)
    chunks = build_chunks(model, layout)
    load_weights(chunks, initial_weights)
    ddp_chunks, optimizer = wrap_for_training(chunks, layout, adam_config(model))
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    schedule = forward_backward_func(layout)

    def forward_step(data_iterator, gpt):
        output = _forward(gpt, next(data_iterator))

        def loss_func(per_token: torch.Tensor):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place

        return output, loss_func

    losses = []
    for step in range(model.steps):
        micro = _micro_batches(model, global_batch(model, step), dp_rank, dp)
        for chunk in ddp_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        iterators = [iter(micro) for _ in ddp_chunks]
        reports = schedule(forward_step_func=forward_step,
                           data_iterator=iterators if len(iterators) > 1 else iterators[0],
                           model=ddp_chunks if len(ddp_chunks) > 1 else ddp_chunks[0],
                           num_microbatches=len(micro), seq_length=model.seq_length,
                           micro_batch_size=model.micro_batch_size, forward_only=False)
        _, grad_norm, _ = optimizer.step()
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            mean = torch.stack([r["loss"] for r in reports]).mean()
            dist.all_reduce(mean, group=parallel_state.get_data_parallel_group())
            losses.append((mean.item() / dp, float(grad_norm)))
    return losses if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None

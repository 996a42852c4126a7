"""Model FLOPs of a training step, counted for what actually ran, plus MFU and peak memory.

What is counted (matrix multiplications only, 2 FLOPs per multiply-add; norms, activations, RoPE,
softmax and the embedding lookup are left out, as in every MFU convention):

* LLM, per real token and layer: q/k/v/o projections, the SwiGLU MLP (or, for MoE layers, the router
  plus top-k experts); per packed segment of s real tokens, causal attention over s(s+1)/2 query-key
  pairs (QKᵀ and PV) — so a packed row costs Σ s_i², never seq²; the LM head per real token.
* ViT, per patch: the patch embedding and each block's qkv/proj/MLP; attention is bidirectional within
  each frame group (one image, or two frames of a video), so it costs (h·w)² per group, never
  (patches of the whole item)²; the final merger and every DeepStack merger per merged token.
* Alignment and tail padding are not counted (they are overhead, not model work); nor is activation
  recomputation (model FLOPs, not hardware FLOPs).

Backward, exactly as autograd runs it: a matmul with weights costs one forward for the input gradient
when a trainable parameter lies upstream, and one forward for the weight gradient when its weights
train; attention (activation × activation) costs two forwards when the gradient flows through it.
So a fully trained layer costs 3× its forward, a frozen layer that gradients pass through 2×
(attention 3×), a frozen part with nothing trainable upstream 1× (e.g. the ViT in stage 0), and a
trained layer whose input needs no gradient 2× (weight gradient only: the patch embedding, which
reads pixels; the mergers start with a trained LayerNorm, so even behind the frozen ViT of stage 0
their linears need both gradients). A text-only row in stage 0 reaches no trainable parameter:
forward only. ``by_part`` keeps attention (vision_attention, llm_attention) apart from the weight
matmuls. Checked against torch's FlopCounterMode on transformers' Qwen3-VL (tests/train/test_flops.py).
"""
from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

# Dense bf16 tensor-core peaks in TFLOP/s (no sparsity), matched against torch.cuda.get_device_name().
# Order matters: more specific names first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A10", 125.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)


@dataclass(frozen=True)
class FlopDims:
    """The sizes the count needs (from ``qwen3vl.model.config.Qwen3VLConfig`` via ``from_model_config``)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    moe_layers: tuple[int, ...] = ()  # indices of layers with a sparse MoE MLP
    experts: int = 0
    top_k: int = 0
    moe_ffn: int = 0
    v_depth: int = 0
    v_hidden: int = 0
    v_ffn: int = 0
    patch_dim: int = 1536
    merge: int = 2
    num_deepstack: int = 3

    @classmethod
    def from_model_config(cls, cfg: Any) -> "FlopDims":
        t, v = cfg.text, cfg.vision
        return cls(hidden=t.hidden_size, layers=t.num_layers, heads=t.num_attention_heads,
                   kv_heads=t.num_key_value_heads, head_dim=t.head_dim, ffn=t.intermediate_size,
                   vocab=t.vocab_size, moe_layers=tuple(i for i in range(t.num_layers) if t.is_moe_layer(i)),
                   experts=t.num_experts, top_k=t.num_experts_per_tok, moe_ffn=t.moe_intermediate_size,
                   v_depth=v.depth, v_hidden=v.hidden_size, v_ffn=v.intermediate_size, patch_dim=v.patch_dim,
                   merge=v.spatial_merge_size, num_deepstack=len(v.deepstack_visual_indexes))

    # --- forward FLOPs per unit ----------------------------------------------------------------------
    def llm_layer_linear_per_token(self, layer: int) -> float:
        qkv = 2 * self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
        attn = qkv + 2 * self.heads * self.head_dim * self.hidden  # + the output projection
        return float(attn + self.llm_layer_mlp_per_token(layer))

    def llm_layer_mlp_per_token(self, layer: int) -> float:
        """The MLP's share of ``llm_layer_linear_per_token`` (the router and experts in an MoE layer)."""
        if layer in self.moe_layers:
            return float(2 * self.hidden * self.experts + self.top_k * 6 * self.hidden * self.moe_ffn)
        return float(6 * self.hidden * self.ffn)

    def llm_attention_per_pair(self) -> float:
        return 4.0 * self.heads * self.head_dim  # QKᵀ and PV

    def vit_block_linear_per_patch(self) -> float:
        return float(8 * self.v_hidden ** 2 + 4 * self.v_hidden * self.v_ffn)

    def merger_fc1_per_token(self) -> float:
        wide = self.v_hidden * self.merge ** 2
        return float(2 * wide * wide)

    def merger_fc2_per_token(self) -> float:
        return float(2 * self.v_hidden * self.merge ** 2 * self.hidden)


@dataclass
class FlopCount:
    """FLOPs of one or more packed rows: forward, backward, and the total by part."""

    forward: float = 0.0
    backward: float = 0.0
    by_part: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def add(self, part: str, fwd: float, bwd_multiple: float) -> None:
        """``fwd`` FLOPs of forward plus ``bwd_multiple`` × ``fwd`` of backward, booked under ``part``."""
        self.forward += fwd
        self.backward += bwd_multiple * fwd
        self.by_part[part] = self.by_part.get(part, 0.0) + (1 + bwd_multiple) * fwd


def _linear_bwd(input_grad: bool, weight_grad: bool) -> float:
    return float(input_grad) + float(weight_grad)


def _attention_bwd(grad_flows: bool) -> float:
    return 2.0 if grad_flows else 0.0


def row_flops(dims: FlopDims, segment_lengths: Sequence[int], grids: Sequence[Sequence[int]],
              trainable: Iterable[str] = ("all",)) -> FlopCount:
    """FLOPs (forward + backward) of one packed row.

    ``segment_lengths``: real tokens of each packed sample; ``grids``: (t, h, w) in patches of every
    image/video in the row; ``trainable``: parts that train ("all" or vision, merger, deepstack_merger, llm).
    """
    trainable = set(trainable)
    every = "all" in trainable
    vision, merger = every or "vision" in trainable, every or "merger" in trainable
    deepstack, llm = every or "deepstack_merger" in trainable, every or "llm" in trainable
    count = FlopCount()
    has_visual = any(t * h * w for t, h, w in grids)
    if has_visual:
        patches = sum(t * h * w for t, h, w in grids)
        merged = patches / dims.merge ** 2
        pairs = sum(t * (h * w) ** 2 for t, h, w in grids)  # full attention within each frame group
        count.add("vision", 2.0 * dims.patch_dim * dims.v_hidden * patches, _linear_bwd(False, vision))
        count.add("vision", dims.v_depth * dims.vit_block_linear_per_patch() * patches, _linear_bwd(vision, vision))
        count.add("vision_attention", dims.v_depth * 4.0 * dims.v_hidden * pairs, _attention_bwd(vision))
        # Each merger starts with its own LayerNorm, so a trained merger's linears also need the input
        # gradient (for the norm's weights), even behind a frozen ViT.
        per_token = dims.merger_fc1_per_token() + dims.merger_fc2_per_token()
        for part, trains, copies in (("merger", merger, 1), ("deepstack_merger", deepstack, dims.num_deepstack)):
            count.add(part, copies * per_token * merged, _linear_bwd(vision or trains, trains))
    # First LLM layer that gradients reach: the embedding (merger output) enters before layer 0, the
    # DeepStack features after layers 0, 1, 2.
    if llm or (has_visual and (vision or merger)):
        first_grad_layer: Optional[int] = 0
    elif has_visual and deepstack and dims.num_deepstack:
        first_grad_layer = 1
    else:
        first_grad_layer = None
    tokens = float(sum(segment_lengths))
    causal_pairs = float(sum(s * (s + 1) // 2 for s in segment_lengths))
    for layer in range(dims.layers):
        flows = first_grad_layer is not None and layer >= first_grad_layer
        count.add("llm", dims.llm_layer_linear_per_token(layer) * tokens, _linear_bwd(flows, llm))
        count.add("llm_attention", dims.llm_attention_per_pair() * causal_pairs, _attention_bwd(flows))
    count.add("lm_head", 2.0 * dims.hidden * dims.vocab * tokens, _linear_bwd(first_grad_layer is not None, llm))
    return count


def batch_flops(dims: FlopDims, batch: Any, trainable: Iterable[str] = ("all",)) -> FlopCount:
    """FLOPs of one ``qwen3vl.data.batch.PackedBatch`` (the full row: count it once, not per CP rank)."""
    real = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    grids = batch.grid_thw.tolist() if batch.grid_thw.numel() else []
    return row_flops(dims, [s for s in real if s > 0], grids, trainable)


# --- hardware -------------------------------------------------------------------------------------------
def peak_tflops(device_name: Optional[str] = None, precision: str = "bf16") -> Optional[float]:
    """Dense peak TFLOP/s of this GPU (bf16), or None on CPU, for fp32, or for an unknown GPU."""
    if precision != "bf16":
        return None
    if device_name is None:
        import torch  # lazy: the demo's parent process imports this (via train.metrics) without torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()), None)


def mfu(model_flops_per_s_per_gpu: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved / peak (None without a known peak)."""
    return model_flops_per_s_per_gpu / (peak * 1e12) if peak else None


def peak_memory_bytes() -> int:
    """This rank's peak memory: allocated GPU memory with CUDA, else the process's peak RSS."""
    import torch  # lazy: the demo's parent process imports this (via train.metrics) without torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def peak_memory_per_rank() -> list[float]:
    """Every rank's peak memory in GiB, in rank order (collective when torch.distributed is initialised;
    call it on all ranks and pass the result to the metrics line as ``peak_memory_gib``)."""
    import torch  # lazy: the demo's parent process imports this (via train.metrics) without torch
    import torch.distributed as dist  # lazy: the demo's parent process imports this (via train.metrics) without torch

    mine = torch.tensor([peak_memory_bytes() / 2 ** 30], dtype=torch.float64)
    if not dist.is_available() or not dist.is_initialized():
        return [float(mine)]
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [float(x) for x in everyone]

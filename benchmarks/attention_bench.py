"""CPU timing of packed attention: PackedCoreAttention (segments batched by shape into SDPA calls) vs one SDPA
call with a dense [T, T] block-diagonal causal mask, forward + backward.

    python -m qwen3vl.benchmarks.attention_bench --seq 2048 --samples 3 --heads 4 --head-dim 64
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))  # qwen3vl_testing

from qwen3vl.model.attention import PackedCoreAttention
from qwen3vl.parallel.micro_batch import build_packed_seq_params
from qwen3vl_testing.attention_reference import packed_attention_mask


def split_lengths(total: int, samples: int) -> list[int]:
    """Unequal sample lengths (1 : 2 : 3 : ...) that add up to ``total``."""
    weights = list(range(1, samples + 1))
    lengths = [total * w // sum(weights) for w in weights]
    lengths[-1] += total - sum(lengths)
    return lengths


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    lengths = split_lengths(args.seq, args.samples)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    params = build_packed_seq_params(cu, cu)
    q, k, v = (torch.randn(args.seq, args.heads, args.head_dim, requires_grad=True) for _ in range(3))
    config = TransformerConfig(num_layers=1, hidden_size=args.heads * args.head_dim, num_attention_heads=args.heads,
                               kv_channels=args.head_dim, attention_dropout=0.0, use_cpu_initialization=True)
    packed = PackedCoreAttention(config, 1, AttnMaskType.causal, "self", kernel="sdpa")
    allowed = packed_attention_mask(cu, cu, causal=True)

    def run_packed():
        packed(q, k, v, None, packed_seq_params=params).sum().backward()

    def run_dense():
        out = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), attn_mask=allowed)
        out.sum().backward()

    def run_packed_forward():
        packed(q, k, v, None, packed_seq_params=params)

    def run_dense_forward():
        F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), attn_mask=allowed)

    with torch.no_grad():
        diff = (packed(q, k, v, None, packed_seq_params=params).reshape(args.seq, args.heads, -1)
                - F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)),
                                                 attn_mask=allowed).transpose(0, 1)).abs().max()
    print(f"lengths={lengths} threads={torch.get_num_threads()} max|diff|={float(diff):.2e}")
    for name, packed_fn, dense_fn in (("forward+backward", run_packed, run_dense),
                                      ("forward", torch.no_grad()(run_packed_forward), torch.no_grad()(run_dense_forward))):
        t_packed, t_dense = timed(packed_fn, args.repeats), timed(dense_fn, args.repeats)
        print(f"{name:>16}: packed {t_packed * 1e3:.1f} ms  dense-mask {t_dense * 1e3:.1f} ms  "
              f"speed-up {t_dense / t_packed:.2f}x")


if __name__ == "__main__":
    main()

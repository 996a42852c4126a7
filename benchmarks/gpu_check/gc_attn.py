"""P5: packed attention on this device, PackedCoreAttention forward + backward through each kernel: time,
TFLOP/s, extra memory, and varlen-vs-sdpa agreement. Shapes: the 2B's LLM (16 q / 8 kv heads of 128,
causal) and ViT (16 heads of 64, bidirectional frame groups), 8K rows (1K on a dry run), 32K on a GPU."""
import torch
from gc_common import DEVICE, ON_GPU, error_text, record
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from qwen3vl.model.attention import PackedCoreAttention
from qwen3vl.parallel.micro_batch import build_packed_seq_params
from qwen3vl_testing.gpu import relative_error


def attention(heads, kv, d, causal, kernel):
    cfg = TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads, num_query_groups=kv,
                            kv_channels=d, attention_dropout=0.0, use_cpu_initialization=True)
    return PackedCoreAttention(cfg, 1, AttnMaskType.causal if causal else AttnMaskType.no_mask, "self", kernel=kernel)


def bench(name, lengths, heads, kv, d, causal, kernel, dtype, reps=10):
    T = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    params = build_packed_seq_params(cu, cu)
    module = attention(heads, kv, d, causal, kernel)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(T, h, d, device=DEVICE, dtype=dtype, generator=g).requires_grad_() for h in (heads, kv, kv))
    grad = torch.randn(T, heads * d, device=DEVICE, dtype=dtype, generator=g)
    pairs = sum(s * (s + 1) // 2 if causal else s * s for s in lengths)
    flops = 4 * heads * d * pairs * 3.5  # forward 2 matmuls, backward 5: 3.5x the forward
    out, res = None, {}
    try:
        out = module(q, k, v, None, packed_seq_params=params)
        out.backward(grad)
        if ON_GPU:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(reps):
                start.record()
                module(q, k, v, None, packed_seq_params=params).backward(grad)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            ms = sorted(times)[len(times) // 2]
            res = dict(ms_fwd_bwd=ms, tflops=flops / ms / 1e9,
                       extra_peak_gib=(torch.cuda.max_memory_allocated() - base) / 2**30)
    except Exception as err:  # noqa: BLE001 - report, do not stop the check
        res = dict(error=error_text(err, 200))
    record("attention_bench", case=name, kernel=kernel, dtype=str(dtype).replace("torch.", ""), T=T,
           segments=len(lengths), **res)
    return out


T = 8192 if ON_GPU else 1024
llm_mixed = [T // 16 * i for i in (1, 2, 3, 4, 6)]
llm_mixed.append(T - sum(llm_mixed))
for name, lengths, heads, kv, d, causal in [("llm_8K_6seg", llm_mixed, 16, 8, 128, True),
                                            ("llm_8K_1seg", [T], 16, 8, 128, True),
                                            ("vit_8K_8groups", [T // 8] * 8, 16, 16, 64, False)]:
    outs = {kernel: bench(name, lengths, heads, kv, d, causal, kernel, torch.bfloat16)
            for kernel in (["varlen", "sdpa"] if ON_GPU else ["sdpa"])}
    if outs.get("varlen") is not None and outs.get("sdpa") is not None:
        record("attention_agree", case=name, varlen_vs_sdpa_rel=relative_error(outs["varlen"], outs["sdpa"]))
# fp32 with GQA: used to fall back to SDPA's math backend (F10); now repeated K/V heads, memory-efficient kernel.
bench("llm_8K_1seg_fp32", [T], 16, 8, 128, True, "sdpa", torch.float32, reps=2)
if ON_GPU:  # the long-context path must stay O(s)
    for kernel in ("varlen", "sdpa"):
        bench("llm_32K_1seg", [32768], 16, 8, 128, True, kernel, torch.bfloat16, reps=3)

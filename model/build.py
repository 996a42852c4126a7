"""Build the model chunks this rank owns, after ``qwen3vl.parallel.groups.initialize_parallel``.

One chunk per virtual pipeline stage (one chunk without interleaving). The first (virtual) stage gets the
embedding and the vision tower, the last the output layer; which stage this rank is comes from megatron's
parallel state. Every parameter and buffer ends up on the one device the caller names (by default the
process's: its GPU in a GPU job, else the CPU), whatever else the machine has.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from megatron.core import parallel_state

from qwen3vl.model.config import Qwen3VLConfig
from qwen3vl.model.qwen3vl import Qwen3VLModel
from qwen3vl.model.transformer_configs import text_transformer_config, vision_transformer_config
from qwen3vl.parallel.groups import process_device


def build_model_chunks(config: Qwen3VLConfig, dtype: torch.dtype = torch.float32,
                       pipeline_layers: Optional[Sequence[int]] = None, attention_backend: str = "auto",
                       vision_recompute: Optional[bool] = None, device: Union[str, torch.device, None] = None,
                       **overrides: Any) -> list[Qwen3VLModel]:
    """This rank's model chunks on ``device``. ``overrides`` go to the LLM's TransformerConfig (e.g.
    sequence_parallel, recompute_granularity, calculate_per_token_loss); ``pipeline_layers`` gives an uneven
    split (layers per stage; the first stage must hold the DeepStack layers). ``vision_recompute``
    recomputes every ViT block in the backward pass; None follows the LLM (on with its full recompute)."""
    config.validate()
    device = process_device() if device is None else torch.device(device)
    on_gpu = device.type == "cuda"
    text_config = text_transformer_config(config, dtype, pipeline_layers, on_gpu=on_gpu, **overrides)
    if vision_recompute is None:
        vision_recompute = overrides.get("recompute_granularity") == "full"
    vision_config = vision_transformer_config(config, dtype, on_gpu=on_gpu, **(
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if vision_recompute else {}))
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunk = Qwen3VLModel(
            config, text_config, vision_config,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage, attention_backend=attention_backend)
        # megatron's parallel layers are already where use_cpu_initialization put them; the model's own
        # modules (norms, patch and position embeddings, mergers' norms) are created on the CPU.
        chunks.append(chunk.to(device))
    return chunks

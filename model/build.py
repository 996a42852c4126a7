"""Build the model chunks this rank owns, after ``qwen3vl.parallel.groups.initialize_parallel``.

One chunk per virtual pipeline stage (one chunk without interleaving). The first (virtual) stage gets the
embedding and the vision tower, the last the output layer; which stage this rank is comes from megatron's
parallel state.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from megatron.core import parallel_state

from qwen3vl.model.config import Qwen3VLConfig
from qwen3vl.model.qwen3vl import Qwen3VLModel
from qwen3vl.model.transformer_configs import text_transformer_config, vision_transformer_config


def build_model_chunks(config: Qwen3VLConfig, dtype: torch.dtype = torch.float32,
                       pipeline_layers: Optional[Sequence[int]] = None, attention_backend: str = "auto",
                       vision_recompute: Optional[bool] = None, **overrides: Any) -> list[Qwen3VLModel]:
    """This rank's model chunks. ``overrides`` go to the LLM's TransformerConfig (e.g. sequence_parallel,
    recompute_granularity, calculate_per_token_loss); ``pipeline_layers`` gives an uneven split
    (layers per stage; the first stage must hold the DeepStack layers). ``vision_recompute`` recomputes
    every ViT block in the backward pass; None follows the LLM (on with its full recompute)."""
    config.validate()
    text_config = text_transformer_config(config, dtype, pipeline_layers, **overrides)
    if vision_recompute is None:
        vision_recompute = overrides.get("recompute_granularity") == "full"
    vision_config = vision_transformer_config(config, dtype, **(
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if vision_recompute else {}))
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(Qwen3VLModel(
            config, text_config, vision_config,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage, attention_backend=attention_backend))
    return chunks

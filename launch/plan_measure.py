"""``qwen3vl-plan --measure``: one real training step (forward and backward, bf16, one CPU rank) of a
CPU-sized version of the model, with the bytes saved for backward counted by
``torch.autograd.graph.saved_tensors_hooks`` and set against the activation model.

The CPU-sized model keeps the preset's structure (dense or MoE, head size, GQA ratio, FFN ratios,
DeepStack, the ViT's shape ratios, the vocabulary) at a smaller width and depth; the recompute setting
is the recipe's. Saved tensors are counted once per storage (views of one buffer are one tensor),
parameters are left out, and only what the forward pass saves counts (full recompute saves again
inside backward, one unit at a time: that is the model's transient term, not measured here). The
count is attributed to the decoder layers, the vision tower and the rest, as the model predicts them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from qwen3vl.data.batch import IGNORE_INDEX, IMAGE, TEXT
from qwen3vl.data.encoded_sample import EncodedSample, PatchRows
from qwen3vl.data.packing import build_row
from qwen3vl.data.rope_index import get_rope_index
from qwen3vl.data.tokenizer import ENDOFTEXT
from qwen3vl.launch.plan_activations import Row, chunk_activations
from qwen3vl.model.config import Qwen3VLConfig
from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel
from qwen3vl.parallel.layout import ParallelLayout
from qwen3vl.train.config import RecomputeCfg
from qwen3vl.train.freeze import apply_freeze, trainable_parts

IMAGE_SIDE = 32  # patches per side of the measured row's image (1,024 patches, 256 LLM tokens)


@dataclass
class Measured:
    seq_length: int
    patches: int
    measured: dict[str, int]
    predicted: dict[str, float]

    @property
    def worst_ratio(self) -> float:
        """The largest relative error of a part (predicted / measured - 1, in absolute value)."""
        return max(abs(self.predicted[k] / self.measured[k] - 1) for k in self.measured if self.measured[k])


def cpu_sized(config: Qwen3VLConfig) -> Qwen3VLConfig:
    """The preset at a width a CPU step takes seconds for: LLM hidden <= 256, ViT width <= 128, three
    LLM layers and three ViT blocks (one DeepStack merger each), at most 8 experts (top-2), and the
    vocabulary narrowed with the width (the special tokens and the padding at its end). Narrowing the vocabulary keeps
    its ratio to the width, which sets the logits' share of the activations, and keeps the step short
    where the CPU has no bf16 matrix units: there, the full vocabulary's output layer alone took minutes
    (a bf16 matmul ran 22x slower than in fp32 on a 2-core AMD EPYC without AVX-512)."""
    t, v = config.text, config.vision
    scale = max(1, t.hidden_size // 256)
    vocab = max(t.vocab_size // scale, 2048)
    special = dict(vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 3, image_token_id=vocab - 2,
                   video_token_id=vocab - 1)
    heads = max(t.num_attention_heads // scale, t.num_attention_heads // t.num_key_value_heads)
    kv = max(1, heads * t.num_key_value_heads // t.num_attention_heads)
    text = replace(t, hidden_size=t.hidden_size // scale, intermediate_size=t.intermediate_size // scale,
                   num_attention_heads=heads, num_key_value_heads=kv, num_layers=3, vocab_size=vocab,
                   num_experts=min(t.num_experts, 8), num_experts_per_tok=min(t.num_experts_per_tok, 2),
                   moe_intermediate_size=max(t.moe_intermediate_size // scale, 1) if t.is_moe else 0)
    vscale = max(1, v.hidden_size // 128)
    vheads = max(1, v.num_heads // vscale)
    vision = replace(v, hidden_size=v.hidden_size // vscale, intermediate_size=v.intermediate_size // vscale,
                     num_heads=vheads, depth=3, deepstack_visual_indexes=(0, 1, 2),
                     out_hidden_size=text.hidden_size)
    return replace(config, name=f"{config.name}-cpu", text=text, vision=vision, **special).validate()


def _row(config: Qwen3VLConfig, seq_length: int):
    """One packed row: a caption sample with one image, a text sample, tail padding."""
    generator = torch.Generator().manual_seed(0)

    def sample(text: int, image: bool) -> EncodedSample:
        ids, types, grid = [], [], torch.zeros(0, 3, dtype=torch.long)
        if image:
            visual = IMAGE_SIDE * IMAGE_SIDE // config.vision.spatial_merge_size ** 2
            ids = [config.vision_start_token_id] + [config.image_token_id] * visual + [config.vision_end_token_id]
            types = [TEXT] + [IMAGE] * visual + [TEXT]
            grid = torch.tensor([[1, IMAGE_SIDE, IMAGE_SIDE]])
        words = torch.randint(0, 1000, (text,), generator=generator).tolist()
        ids_t, types_t = torch.tensor(ids + words), torch.tensor(types + [TEXT] * text)
        labels = torch.cat([ids_t[1:], torch.tensor([IGNORE_INDEX])])
        # As the encoder labels a caption: only text is predicted, not the picture or its markers.
        targets = torch.cat([types_t[1:], torch.tensor([TEXT])])
        markers = (labels == config.vision_start_token_id) | (labels == config.vision_end_token_id)
        labels[(targets != TEXT) | markers] = IGNORE_INDEX
        position = get_rope_index(ids_t, grid if image else None, None, types_t)
        pixels = torch.randn(int(grid.prod(-1).sum()) if image else 0, config.vision.patch_dim, generator=generator)
        media = (PatchRows(pixels.numpy()),) if image else ()
        return EncodedSample(ids_t, labels, types_t, position, media, grid, "caption" if image else "text", "m")

    image = sample(seq_length // 4, True)
    row = build_row([image, sample(seq_length - image.length - seq_length // 8, False)], seq_length)
    row.tokens[row.tokens == ENDOFTEXT] = config.vision_start_token_id - 1  # the padding, in cpu_sized's vocab
    return row


@contextmanager
def _count_saved(model: torch.nn.Module, parts: dict[str, torch.nn.Module]) -> Iterator[dict[str, int]]:
    counts = {name: 0 for name in parts} | {"other": 0}
    stack = ["other"]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # Each saved storage once, by identity (not address: freed memory is handed out again), with the part
    # that saved it first; its size is read when the forward is over, as it is then held for backward:
    # the norms' recompute (megatron's CheckpointWithoutOutput) frees an output a linear saved, in place.
    saved: dict[int, tuple[str, torch.UntypedStorage]] = {}

    def enter(name):
        def hook(module, args) -> None:
            stack.append(name)
        return hook

    def leave(module, args, output) -> None:  # (a hook that returned a value would replace the output)
        stack.pop()

    handles = []
    for name, module in parts.items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved.setdefault(storage._cdata, (stack[-1], storage))
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield counts
    finally:
        for handle in handles:
            handle.remove()
        for part, storage in saved.values():
            counts[part] += storage.nbytes()
        saved.clear()


def measure(config: Qwen3VLConfig, recompute: RecomputeCfg, trainable=("all",), seq_length: int = 1024) -> Measured:
    """One bf16 training step of ``cpu_sized(config)`` with the stage's trainable parts, on this process
    (a one-rank gloo group)."""
    from qwen3vl.model.build import build_model_chunks  # lazy: megatron takes seconds; only for --measure
    from qwen3vl.parallel.context_parallel import model_inputs  # lazy: megatron takes seconds; only for --measure

    small = cpu_sized(config)
    layout = ParallelLayout()
    initialize_parallel(layout)
    try:
        overrides = recompute.megatron_overrides()
        [model] = build_model_chunks(small, torch.bfloat16, calculate_per_token_loss=True,
                                     vision_recompute=recompute.vision, **overrides)
        apply_freeze([model], list(trainable))
        model.train()
        row = _row(small, seq_length)
        inputs = model_inputs(row)  # fp32 pixels, as training feeds them (the patch embedding casts)
        parts = {"llm": model.decoder, "vision": model.vision, "other": model.decoder.final_layernorm}
        with _count_saved(model, parts) as counts:
            loss = model(**inputs.model_kwargs())
        loss.sum().backward()
        patches = int(row.pixel_values.shape[0])
        labelled = int((row.labels != IGNORE_INDEX).sum())  # the row's own, padding and pictures left out
        predicted = chunk_activations(small, Row(seq_length, patches, labelled=labelled), layout, recompute,
                                      range(small.text.num_layers), True, True,
                                      frozenset(trainable_parts(list(trainable))))
        return Measured(seq_length, patches, dict(counts),
                        {"llm": predicted.llm, "vision": predicted.vision, "other": predicted.other})
    finally:
        destroy_parallel(shutdown_distributed=True)

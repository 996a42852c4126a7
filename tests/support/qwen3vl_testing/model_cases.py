"""Test helpers: small synthetic Qwen3-VL samples, packing them into a ``PackedBatch``, running the
transformers reference on them, and running our model on any TP x PP layout to full logits.

Used by tests/model (and usable for quick checks by hand); workers of
``qwen3vl_testing.distributed.run_distributed`` import it like any package module.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from qwen3vl.data.batch import IGNORE_INDEX, IMAGE, TEXT, VIDEO, PackedBatch
from qwen3vl.model.config import Qwen3VLConfig
from qwen3vl.model.presets import get_preset
from qwen3vl.data.rope_index import get_rope_index
from qwen3vl.parallel.micro_batch import MicroBatch

PAD_TOKEN = 151643


def named_config(name: str) -> Qwen3VLConfig:
    """A preset, or ``tiny-tied``: the tiny model with tied input/output embeddings (as 2B/4B)."""
    if name == "tiny-tied":
        return replace(get_preset("tiny"), name=name, tie_word_embeddings=True)
    return get_preset(name)


@dataclass
class Sample:
    """One unpacked sample: tokens and its media in row order (kind, grid (t, h, w), pixel rows)."""

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    media: list[tuple[int, tuple[int, int, int], torch.Tensor]] = field(default_factory=list)

    def grids(self, kind: int) -> torch.Tensor | None:
        grids = [g for k, g, _ in self.media if k == kind]
        return torch.tensor(grids, dtype=torch.long) if grids else None

    def pixels(self, kind: int) -> torch.Tensor | None:
        rows = [p for k, _, p in self.media if k == kind]
        return torch.cat(rows) if rows else None

    def labels(self) -> torch.Tensor:
        """Next-token targets within the sample; the last token predicts nothing."""
        return torch.cat([self.input_ids[1:], torch.tensor([IGNORE_INDEX])])


class SampleBuilder:
    """Builds token sequences the way the transformers 5.x processor lays them out."""

    def __init__(self, config: Qwen3VLConfig, seed: int = 0) -> None:
        self.config = config
        self.gen = torch.Generator().manual_seed(seed)
        self.ids: list[int] = []
        self.types: list[int] = []
        self.media: list = []

    def text(self, n: int) -> "SampleBuilder":
        self.ids += torch.randint(1, 5000, (n,), generator=self.gen).tolist()
        self.types += [TEXT] * n
        return self

    def _special(self, token: int) -> None:
        self.ids.append(token)
        self.types.append(TEXT)

    def _pixels(self, t: int, h: int, w: int) -> torch.Tensor:
        return torch.randn(t * h * w, self.config.vision.patch_dim, generator=self.gen)

    def image(self, h: int, w: int) -> "SampleBuilder":
        merge = self.config.vision.spatial_merge_size
        self._special(self.config.vision_start_token_id)
        n = h * w // merge**2
        self.ids += [self.config.image_token_id] * n
        self.types += [IMAGE] * n
        self._special(self.config.vision_end_token_id)
        self.media.append((IMAGE, (1, h, w), self._pixels(1, h, w)))
        return self

    def video(self, t: int, h: int, w: int) -> "SampleBuilder":
        """Outer vision_start/end around t frame groups, each led by 2 'timestamp' text tokens."""
        merge = self.config.vision.spatial_merge_size
        self._special(self.config.vision_start_token_id)
        for _ in range(t):
            self.text(2)
            self._special(self.config.vision_start_token_id)
            n = h * w // merge**2
            self.ids += [self.config.video_token_id] * n
            self.types += [VIDEO] * n
            self._special(self.config.vision_end_token_id)
        self._special(self.config.vision_end_token_id)
        self.media.append((VIDEO, (t, h, w), self._pixels(t, h, w)))
        return self

    def build(self) -> Sample:
        return Sample(torch.tensor(self.ids), torch.tensor(self.types), list(self.media))


def make_case(name: str, config: Qwen3VLConfig, seed: int = 0) -> Sample:
    """The named test inputs: image, images (different sizes, smaller and larger than the tiny 8 x 8
    position table), video, text, image_video."""
    b = SampleBuilder(config, seed)
    if name == "image":
        return b.text(2).image(4, 6).text(1).build()
    if name == "images":
        return b.text(3).image(4, 6).text(2).image(2, 2).text(1).image(6, 4).text(1).image(10, 12).text(3).build()
    if name == "video":
        return b.text(2).video(2, 4, 4).text(1).build()
    if name == "text":
        return b.text(9).build()
    if name == "image_video":
        return b.text(2).video(2, 2, 4).text(2).image(4, 4).text(2).build()
    raise KeyError(f"unknown case {name!r}")


def pack_samples(samples: list[Sample], pad_multiple: int = 1, tail: int = 0) -> PackedBatch:
    """One packed row: each sample padded to ``pad_multiple``, then ``tail`` padding as an empty segment."""
    tokens, labels, positions, types, real, padded, counts = [], [], [], [], [0], [0], []
    for s in samples:
        length = s.input_ids.numel()
        pad = -length % pad_multiple
        lab = s.labels()
        tokens += [s.input_ids, torch.full((pad,), PAD_TOKEN)]
        labels += [lab, torch.full((pad,), IGNORE_INDEX)]
        positions += [get_rope_index(s.input_ids, s.grids(IMAGE), s.grids(VIDEO), s.mm_token_type_ids),
                      torch.zeros(3, pad, dtype=torch.long)]
        types += [s.mm_token_type_ids, torch.zeros(pad, dtype=torch.long)]
        real.append(real[-1] + length)
        padded.append(padded[-1] + length + pad)
        counts.append(int((lab != IGNORE_INDEX).sum()))
    if tail:
        tokens.append(torch.full((tail,), PAD_TOKEN))
        labels.append(torch.full((tail,), IGNORE_INDEX))
        positions.append(torch.zeros(3, tail, dtype=torch.long))
        types.append(torch.zeros(tail, dtype=torch.long))
        real.append(real[-1])
        padded.append(padded[-1] + tail)
        counts.append(0)
    media = [m for s in samples for m in s.media]
    batch = PackedBatch(
        tokens=torch.cat(tokens).long(), labels=torch.cat(labels).long(), position_ids=torch.cat(positions, 1),
        mm_token_type_ids=torch.cat(types).long(), cu_seqlens=torch.tensor(real, dtype=torch.int32),
        cu_seqlens_padded=torch.tensor(padded, dtype=torch.int32),
        sample_loss_tokens=torch.tensor(counts, dtype=torch.long),
        pixel_values=torch.cat([p for _, _, p in media]) if media else torch.zeros(0, 1536),
        grid_thw=torch.tensor([g for _, g, _ in media], dtype=torch.long).reshape(-1, 3),
        pad_multiple=pad_multiple)
    batch.validate()
    return batch


def real_positions(batch: PackedBatch) -> list[torch.Tensor]:
    """Row positions of each sample's real tokens (the tail segment excluded when empty)."""
    out = []
    for i in range(batch.num_segments):
        start, length = int(batch.cu_seqlens_padded[i]), int(batch.cu_seqlens[i + 1] - batch.cu_seqlens[i])
        if length:
            out.append(torch.arange(start, start + length))
    return out


def hf_forward(hf_model, sample: Sample, labels: bool = False, device: torch.device | str = "cpu"):
    """transformers' output for one sample (batch of 1), its inputs on ``device``."""
    kwargs = dict(input_ids=sample.input_ids[None], mm_token_type_ids=sample.mm_token_type_ids[None])
    if sample.grids(IMAGE) is not None:
        kwargs.update(pixel_values=sample.pixels(IMAGE), image_grid_thw=sample.grids(IMAGE))
    if sample.grids(VIDEO) is not None:
        kwargs.update(pixel_values_videos=sample.pixels(VIDEO), video_grid_thw=sample.grids(VIDEO))
    return hf_model(**{k: v.to(device) for k, v in kwargs.items()})


def hf_token_loss(logits: torch.Tensor, sample: Sample) -> torch.Tensor:
    """[L] per-token cross entropy of the reference logits [L, V] (0 where nothing is predicted)."""
    target = sample.labels()
    loss = F.cross_entropy(logits.float(), target.clamp(min=0), reduction="none")
    return loss.masked_fill(target == IGNORE_INDEX, 0.0)


def stage_forward(model, inputs: MicroBatch, with_labels: bool = False) -> torch.Tensor | None:
    """Run one forward through every pipeline stage with plain send/recv (no schedule, no backward).

    ``inputs`` as ``model_inputs`` returns them. Returns, on the last stage, the logits gathered over TP
    ([T, V]) or, ``with_labels``, the per-token loss [T]; None on other stages.
    """
    kwargs = inputs.model_kwargs(with_labels)
    if not model.pre_process:
        rows = inputs.input_ids.shape[0]
        if model.config.sequence_parallel:
            rows //= parallel_state.get_tensor_model_parallel_world_size()
        received = torch.empty(rows, 1, model.config.hidden_size, dtype=model.config.params_dtype)
        dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(received)
    out = model(**kwargs)
    if not model.post_process:
        dist.send(out.detach().contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    return out if with_labels else gather_from_tensor_model_parallel_region(out)

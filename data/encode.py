"""A raw shard sample -> token ids, shifted labels, MRoPE positions and pixels, exactly as Qwen3-VL sees them.

Rendering per kind (VS/VE = <|vision_start|>/<|vision_end|>, IMG = <|image_pad|> x (h*w/4)):

* caption      ``VS IMG VE`` per image, then the text, then ``<|endoftext|>``
* interleaved  items in order (text verbatim, no separators), then ``<|endoftext|>``
* video        the video placeholder (below), then the text, then ``<|endoftext|>``
* text         the text, then ``<|endoftext|>``
* conversation ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, no default system
               prompt, media inside content rendered like interleaved items (the Qwen3-VL chat template).

A video with temporal patches k = 0..t-1 becomes ``VS [<t_k seconds> VS VID VE]... VE`` with
VID = <|video_pad|> x (h*w/4): the outer VS/VE pair is what transformers >= 5 produces (its processor
replaces only the template's <|video_pad|>), which is also what inference through the current HF
processor feeds the model; ``ProcessingConfig.video_outer_wrapper=False`` gives the transformers 4.57
form without it.

Loss tokens (``labels[p]`` = token p+1 if token p+1 is a loss token, else IGNORE; the last is IGNORE):
text documents train on every token including the closing ``<|endoftext|>`` (plain LM pretraining);
captions, interleaved documents and video captions only on the authored text (never on vision pads,
VS/VE, timestamps or ``<|endoftext|>``, which the model cannot or need not predict); conversations on
assistant turns only: their content, ``<|im_end|>`` and the following newline (as qwen-vl-finetune).

A text-only sample longer than ``seq_length`` is cut into consecutive chunks of at most
``seq_length`` tokens, each its own sample (labels shifted inside the chunk, own position ids from 0);
chunks without loss tokens are dropped. A longer multimodal sample raises ``too_long_multimodal``.
Data text is tokenised as ordinary text: an added-token name inside it (``<|image_pad|>``) stays text.
Media are sized from their headers first; pixels are decoded only once the sample is known to fit.
"""
from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from typing import Callable

import torch

from qwen3vl.data.batch import IGNORE_INDEX, IMAGE, PATCH_DIM, TEXT, VIDEO
from qwen3vl.data.encoded_sample import EncodedSample
from qwen3vl.data.image_processing import image_grid, load_rgb, open_image, process_image
from qwen3vl.data.processing_config import ProcessingConfig
from qwen3vl.data.sample_format import (BadSample, Document, ImagePart, RawSample, TextPart, VideoPart,
                                        parse_sample)
from qwen3vl.data.tokenizer import Tokenizer, load_tokenizer
from qwen3vl.data.video_decoding import decode_frames, probe_video
from qwen3vl.data.video_processing import (format_timestamp, frames_size, plan_video, process_video,
                                           sample_frame_indices)
from qwen3vl.model.rope_index import get_rope_index


@dataclass
class _Text:
    text: str
    loss: bool


@dataclass
class _Special:
    name: str
    loss: bool = False


@dataclass
class _Visual:
    kind: int  # IMAGE or VIDEO
    num_tokens: int  # merged tokens of this run


@dataclass
class _Media:
    kind: int
    grid: tuple[int, int, int]
    load: Callable[[], torch.Tensor]  # decodes the pixels: called only once the sample is known to fit


class SampleEncoder:
    """``SampleEncoder(tokenizer, cfg).encode(raw) -> list[EncodedSample]`` (several only for long text).
    Raises ``BadSample`` for content that cannot be trained on. Deterministic given (cfg.seed, raw)."""

    def __init__(self, tokenizer: Tokenizer | None = None, cfg: ProcessingConfig | None = None):
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        self.cfg = cfg if cfg is not None else ProcessingConfig()
        self.cfg.validate()
        self._ids = {name: self.tokenizer.token_id(name) for name in (
            "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>")}

    # --- public ---------------------------------------------------------------------------------
    def encode(self, raw: RawSample) -> list[EncodedSample]:
        doc = parse_sample(raw)
        pieces, media = self._render(doc, raw)  # sizes media from their headers only
        ids, loss, types = self._tokenize(pieces)
        if doc.is_multimodal:
            if len(ids) > self.cfg.seq_length:
                raise BadSample("too_long_multimodal", f"sample {raw.key!r}: {len(ids)} tokens with images or "
                                f"video exceed seq_length {self.cfg.seq_length}; it cannot be cut through media")
            spans = [(0, len(ids))]
        else:
            spans = [(s, min(s + self.cfg.seq_length, len(ids))) for s in range(0, len(ids), self.cfg.seq_length)]
        pixels = [m.load() for m in media]
        samples = [self._sample(ids[a:b], loss[a:b], types[a:b], media, pixels, doc) for a, b in spans]
        samples = [s for s in samples if s.num_loss_tokens > 0]
        if not samples:
            raise BadSample("no_loss_tokens", f"sample {raw.key!r} has no token to train on")
        return samples

    # --- rendering: document -> pieces ----------------------------------------------------------
    def _render(self, doc: Document, raw: RawSample) -> tuple[list, list[_Media]]:
        pieces: list = []
        media: list[_Media] = []
        style = self._timestamp_style(doc.key)
        if doc.kind == "conversation":
            for msg in doc.messages:
                trained = msg.role == "assistant"
                pieces += [_Special("<|im_start|>"), _Text(f"{msg.role}\n", False)]
                self._render_parts(msg.parts, trained, raw, style, pieces, media)
                pieces += [_Special("<|im_end|>", trained), _Text("\n", trained)]
            return pieces, media
        (msg,) = doc.messages
        self._render_parts(msg.parts, True, raw, style, pieces, media)
        if self.cfg.append_eos:
            pieces.append(_Special("<|endoftext|>", loss=doc.kind == "text"))
        return pieces, media

    def _render_parts(self, parts, trained: bool, raw: RawSample, style: str, pieces: list,
                      media: list[_Media]) -> None:
        for part in parts:
            if isinstance(part, TextPart):
                pieces.append(_Text(part.text, trained))
            elif isinstance(part, ImagePart):
                item = self._image(raw, part)
                media.append(item)
                pieces += [_Special("<|vision_start|>"), _Visual(IMAGE, self._tokens_per_frame(item.grid)),
                           _Special("<|vision_end|>")]
            else:
                item, times = self._video(raw, part)
                media.append(item)
                pieces += self._video_placeholder(item.grid, times, style)

    def _video_placeholder(self, grid: tuple[int, int, int], times: list[float], style: str) -> list:
        per_group = self._tokens_per_frame(grid)
        out: list = [_Special("<|vision_start|>")] if self.cfg.video_outer_wrapper else []
        for t in times:
            out += [_Text(format_timestamp(t, style), False), _Special("<|vision_start|>"),
                    _Visual(VIDEO, per_group), _Special("<|vision_end|>")]
        if self.cfg.video_outer_wrapper:
            out.append(_Special("<|vision_end|>"))
        return out

    def _tokens_per_frame(self, grid: tuple[int, int, int]) -> int:
        return grid[1] * grid[2] // self.cfg.merge_size ** 2

    def _timestamp_style(self, key: str) -> str:
        if self.cfg.timestamp_format != "both":
            return self.cfg.timestamp_format
        digest = hashlib.blake2b(f"{self.cfg.seed}:{key}".encode(), digest_size=8).digest()
        return ("seconds", "hms")[digest[0] & 1]

    # --- media: size from headers now, decode later ----------------------------------------------
    def _image(self, raw: RawSample, part: ImagePart) -> _Media:
        c = self.cfg
        where = f"sample {raw.key!r} image {part.media!r}"
        image = open_image(raw.media[part.media], where)
        try:
            grid = image_grid(image.height, image.width, c.min_pixels, c.max_pixels, c.patch_size, c.merge_size)
        except BadSample as e:
            raise BadSample(e.reason, f"{where}: {e.message}") from None

        def load() -> torch.Tensor:
            pixels, _ = process_image(load_rgb(image, where), c.min_pixels, c.max_pixels, c.patch_size,
                                      c.merge_size, c.temporal_patch_size)
            return pixels

        return _Media(IMAGE, grid, load)

    def _video(self, raw: RawSample, part: VideoPart) -> tuple[_Media, list[float]]:
        if part.file is not None:
            return self._video_file(raw, part.file)
        c = self.cfg
        where = f"sample {raw.key!r} video"
        indices = sample_frame_indices(len(part.frames), part.fps, c.video_fps, c.video_min_frames,
                                       c.video_max_frames)
        names = [part.frames[i] for i in indices]
        frames = [open_image(raw.media[n], f"{where} frame {n!r}") for n in names]
        times = [part.timestamps[i] for i in indices]

        def load_frames() -> list:
            return [load_rgb(f, f"{where} frame {n!r}") for f, n in zip(frames, names)]

        return self._video_media(where, lambda: frames_size(frames), times, load_frames)

    def _video_file(self, raw: RawSample, name: str) -> tuple[_Media, list[float]]:
        """A video file member: sampled like stored frames at the stream's rate (frame i at i / fps)."""
        c = self.cfg
        where = f"sample {raw.key!r} video {name!r}"
        info = probe_video(raw.media[name], where)
        indices = sample_frame_indices(info.num_frames, info.fps, c.video_fps, c.video_min_frames,
                                       c.video_max_frames)
        times = [i / info.fps for i in indices]
        return self._video_media(where, lambda: (info.height, info.width), times,
                                 lambda: decode_frames(raw.media[name], indices, where))

    def _video_media(self, where: str, size: Callable[[], tuple[int, int]], times: list[float],
                     load_frames: Callable[[], list]) -> tuple[_Media, list[float]]:
        """Plans a sampled clip from its frame size now; ``load_frames`` gives its RGB frames later."""
        settings = self.cfg.video_settings()
        try:
            plan = plan_video(len(times), *size(), times, settings)
        except BadSample as e:
            raise BadSample(e.reason, f"{where}: {e.message}") from None

        def load() -> torch.Tensor:
            pixels, _ = process_video(load_frames(), times, settings)
            return pixels

        return _Media(VIDEO, plan.grid_thw, load), plan.group_times

    # --- tokens ---------------------------------------------------------------------------------
    def _tokenize(self, pieces: list) -> tuple[list[int], list[bool], list[int]]:
        """Pieces -> (ids, is-loss-token, mm type). Adjacent text pieces are tokenised together, as
        the HF processor tokenises the whole prompt; each token takes the loss flag of the piece its
        first character belongs to."""
        ids: list[int] = []
        loss: list[bool] = []
        types: list[int] = []
        run: list[_Text] = []

        def flush_text() -> None:
            if not run:
                return
            texts = [unicodedata.normalize("NFC", p.text) for p in run]
            starts, pos = [], 0
            for t in texts:
                starts.append(pos)
                pos += len(t)
            run_ids, offsets = self.tokenizer.encode_with_offsets("".join(texts))
            piece = 0
            for tok, off in zip(run_ids, offsets):
                while piece + 1 < len(run) and off >= starts[piece + 1]:
                    piece += 1
                ids.append(tok)
                loss.append(run[piece].loss)
                types.append(TEXT)
            run.clear()

        for p in pieces:
            if isinstance(p, _Text):
                run.append(p)
                continue
            flush_text()
            if isinstance(p, _Special):
                ids.append(self._ids[p.name])
                loss.append(p.loss)
                types.append(TEXT)
            else:
                pad = self._ids["<|image_pad|>" if p.kind == IMAGE else "<|video_pad|>"]
                ids += [pad] * p.num_tokens
                loss += [False] * p.num_tokens
                types += [p.kind] * p.num_tokens
        flush_text()
        return ids, loss, types

    def _sample(self, ids: list[int], loss: list[bool], types: list[int], media: list[_Media],
                pixels: list[torch.Tensor], doc: Document) -> EncodedSample:
        tokens = torch.tensor(ids, dtype=torch.long)
        labels = torch.full_like(tokens, IGNORE_INDEX)
        is_loss = torch.tensor(loss, dtype=torch.bool)
        labels[:-1] = torch.where(is_loss[1:], tokens[1:], labels[:-1])
        mm = torch.tensor(types, dtype=torch.long)
        image_grids = _grid_tensor([m.grid for m in media if m.kind == IMAGE])
        video_grids = _grid_tensor([m.grid for m in media if m.kind == VIDEO])
        positions = get_rope_index(tokens, image_grids, video_grids, mm, self.cfg.merge_size)
        pixel_values = torch.cat(pixels) if pixels else torch.zeros(0, PATCH_DIM, dtype=torch.float32)
        return EncodedSample(tokens=tokens, labels=labels, mm_token_type_ids=mm, position_ids=positions,
                             pixel_values=pixel_values, grid_thw=_grid_tensor([m.grid for m in media]),
                             kind=doc.kind, key=doc.key)


def _grid_tensor(grids: list[tuple[int, int, int]]) -> torch.Tensor:
    return torch.tensor(grids, dtype=torch.long).reshape(-1, 3)

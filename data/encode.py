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

import numpy as np
import torch

from qwen3vl.data.batch import IGNORE_INDEX, IMAGE, TEXT, VIDEO
from qwen3vl.data.encoded_sample import EncodedSample
from qwen3vl.data.image_processing import DecodedFrames, image_frames, image_grid, load_rgb, open_image
from qwen3vl.data.processing_config import ProcessingConfig
from qwen3vl.data.sample_format import (BadSample, Document, ImagePart, RawSample, TextPart, VideoPart,
                                        parse_sample)
from qwen3vl.data.tokenizer import Tokenizer, load_tokenizer
from qwen3vl.data.video_decoding import decode_frames, probe_video
from qwen3vl.data.video_processing import (format_timestamp, frames_size, plan_video, video_frames,
                                           sample_frame_indices)
from qwen3vl.data.rope_index import get_rope_index


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
    decode: Callable[[], DecodedFrames]  # decodes the pixels: called only once the sample is known to fit


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
        decoded = tuple(m.decode() for m in media)
        samples = [self._sample(ids[a:b], loss[a:b], types[a:b], media, decoded, doc) for a, b in spans]
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

        def decode() -> DecodedFrames:
            return image_frames(load_rgb(image, where), c.min_pixels, c.max_pixels, c.patch_size, c.merge_size,
                                c.temporal_patch_size)

        return _Media(IMAGE, grid, decode)

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

        def decode() -> DecodedFrames:
            return video_frames(load_frames(), times, settings)[0]

        return _Media(VIDEO, plan.grid_thw, decode), plan.group_times

    # --- tokens ---------------------------------------------------------------------------------
    def _tokenize(self, pieces: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pieces -> (ids int64, is-loss-token bool, mm type int64). Adjacent text pieces are tokenised
        together, as the HF processor tokenises the whole prompt; each token takes the loss flag of the
        piece its first character belongs to. Arrays throughout: a per-token Python loop here would
        cost more than the tokenizer itself."""
        ids: list[np.ndarray] = []
        loss: list[np.ndarray] = []
        types: list[np.ndarray] = []
        run: list[_Text] = []

        def flush_text() -> None:
            if not run:
                return
            texts = [unicodedata.normalize("NFC", p.text) for p in run]
            flags = np.array([p.loss for p in run])
            if flags.all() or not flags.any():  # one flag for the whole run: no offsets needed
                run_ids = np.asarray(self.tokenizer.encode("".join(texts)), dtype=np.int64)
                run_loss = np.full(run_ids.shape, bool(flags[0]))
            else:
                starts = np.cumsum([0] + [len(t) for t in texts[:-1]])
                token_ids, offsets = self.tokenizer.encode_with_offsets("".join(texts))
                run_ids = np.asarray(token_ids, dtype=np.int64)
                # The piece a token starts in: the last piece starting at or before its offset (an empty
                # piece shares its start with the next one and so is never chosen).
                piece = np.searchsorted(starts, np.asarray(offsets, dtype=np.int64), side="right") - 1
                run_loss = flags[piece]
            ids.append(run_ids)
            loss.append(run_loss)
            types.append(np.full(run_ids.shape, TEXT, dtype=np.int64))
            run.clear()

        for p in pieces:
            if isinstance(p, _Text):
                run.append(p)
                continue
            flush_text()
            if isinstance(p, _Special):
                ids.append(np.array([self._ids[p.name]], dtype=np.int64))
                loss.append(np.array([p.loss]))
                types.append(np.array([TEXT], dtype=np.int64))
            else:
                pad = self._ids["<|image_pad|>" if p.kind == IMAGE else "<|video_pad|>"]
                ids.append(np.full(p.num_tokens, pad, dtype=np.int64))
                loss.append(np.zeros(p.num_tokens, dtype=bool))
                types.append(np.full(p.num_tokens, p.kind, dtype=np.int64))
        flush_text()
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.int64)
        return np.concatenate(ids), np.concatenate(loss), np.concatenate(types)

    def _sample(self, ids: np.ndarray, loss: np.ndarray, types: np.ndarray, media: list[_Media],
                decoded: tuple[DecodedFrames, ...], doc: Document) -> EncodedSample:
        tokens = torch.from_numpy(np.ascontiguousarray(ids))
        labels = torch.full_like(tokens, IGNORE_INDEX)
        is_loss = torch.from_numpy(np.ascontiguousarray(loss))
        labels[:-1] = torch.where(is_loss[1:], tokens[1:], labels[:-1])
        mm = torch.from_numpy(np.ascontiguousarray(types))
        image_grids = _grid_tensor([m.grid for m in media if m.kind == IMAGE])
        video_grids = _grid_tensor([m.grid for m in media if m.kind == VIDEO])
        positions = get_rope_index(tokens, image_grids, video_grids, mm, self.cfg.merge_size)
        return EncodedSample(tokens=tokens, labels=labels, mm_token_type_ids=mm, position_ids=positions,
                             media=decoded, grid_thw=_grid_tensor([m.grid for m in media]), kind=doc.kind, key=doc.key)


def _grid_tensor(grids: list[tuple[int, int, int]]) -> torch.Tensor:
    return torch.tensor(grids, dtype=torch.long).reshape(-1, 3)

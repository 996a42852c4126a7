"""3-row MRoPE position ids (t, h, w) of one sample, as transformers' Qwen3-VL ``get_rope_index`` computes them.

Walk the tokens with a counter ``cur`` from 0. A text token (including vision_start/end and the
timestamp text of videos) gets (cur, cur, cur) and advances ``cur`` by 1. A maximal run of visual
tokens is one image, or one temporal patch (frame group) of a video, with merged grid (gh, gw):
token (a, b) in raster order gets (cur, cur + a, cur + b), then ``cur += max(gh, gw)``. Video frame
groups all get temporal offset 0: time is carried by the timestamp text between groups.
"""
from __future__ import annotations

import torch

from qwen3vl.data.batch import IMAGE, TEXT, VIDEO


def get_rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                   video_grid_thw: torch.Tensor | None, mm_token_type_ids: torch.Tensor,
                   spatial_merge_size: int = 2) -> torch.Tensor:
    """Position ids [3, L] (int64) for one unpadded sample.

    Args:
        input_ids: [L] token ids (only the length is used; runs are found from ``mm_token_type_ids``).
        image_grid_thw: [Mi, 3] (t, h, w) in patches of the images, in token order, or None.
        video_grid_thw: [Mv, 3] of the videos, in token order, or None.
        mm_token_type_ids: [L] TEXT / IMAGE / VIDEO per token.
    """
    L = int(input_ids.numel())
    if mm_token_type_ids.shape != (L,):
        raise ValueError(f"mm_token_type_ids has shape {tuple(mm_token_type_ids.shape)}, expected ({L},)")
    grids = {IMAGE: _frame_grids(image_grid_thw), VIDEO: _frame_grids(video_grid_thw)}
    if not grids[IMAGE] and not grids[VIDEO] and not bool(mm_token_type_ids.ne(TEXT).any()):
        return torch.arange(L).expand(3, L).clone()  # text only: one run
    used = {IMAGE: 0, VIDEO: 0}
    out = torch.empty(3, L, dtype=torch.long)
    cur = 0
    for start, end, kind in _runs(mm_token_type_ids):
        if kind == TEXT:
            n = end - start
            out[:, start:end] = torch.arange(cur, cur + n).expand(3, n)
            cur += n
            continue
        if kind not in grids:
            raise ValueError(f"unknown mm_token_type_ids value {kind} at position {start}")
        if used[kind] >= len(grids[kind]):
            name = "image" if kind == IMAGE else "video frame group"
            raise ValueError(f"more {name} runs in the tokens than grids given ({len(grids[kind])})")
        h, w = grids[kind][used[kind]]
        used[kind] += 1
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        if end - start != gh * gw:
            raise ValueError(f"visual run at {start} has {end - start} tokens, its grid needs {gh * gw}")
        rows = torch.arange(gh).repeat_interleave(gw)
        cols = torch.arange(gw).repeat(gh)
        out[0, start:end] = cur
        out[1, start:end] = cur + rows
        out[2, start:end] = cur + cols
        cur += max(gh, gw)
    for kind, name in ((IMAGE, "image"), (VIDEO, "video frame group")):
        if used[kind] != len(grids[kind]):
            raise ValueError(f"{len(grids[kind])} {name} grids given but {used[kind]} runs in the tokens")
    return out


def _frame_grids(grid_thw: torch.Tensor | None) -> list[tuple[int, int]]:
    """Each (t, h, w) row becomes t (h, w) frame grids: every temporal patch is its own run."""
    if grid_thw is None:
        return []
    return [(int(h), int(w)) for t, h, w in grid_thw.tolist() for _ in range(int(t))]


def _runs(types: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values: (start, end, value), found with one vectorised comparison."""
    if types.numel() == 0:
        return []
    bounds = [0] + (torch.nonzero(types[1:] != types[:-1]).flatten() + 1).tolist() + [int(types.numel())]
    values = types[bounds[:-1]].tolist()
    return [(a, b, v) for a, b, v in zip(bounds[:-1], bounds[1:], values)]

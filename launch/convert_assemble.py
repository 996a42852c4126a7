"""``qwen3vl-convert assemble``: a Qwen3-VL dist checkpoint from a pretrained Qwen3 LLM and a SigLIP-2 ViT.

Where the Qwen3-VL report starts: the LLM and the vision tower pretrained, the mergers new, ready for S0
(which trains only the mergers). The parts are checked against transformers and the architecture against
the preset before any tensor is read; the weights then stream into the checkpoint one at a time, like
``hf-to-mcore`` (``qwen3vl.model.interop.assemble_weights`` says what is carried and how). The output
lists what was carried, what is new (with its init), what the parts hold that was not used, and where
the architecture departs from the preset; the same goes to ``assembled_from.json`` next to the shards.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from qwen3vl.launch.convert_commands import new_output_dir, save_dist_checkpoint
from qwen3vl.model.interop.assemble_config import assembled_config, changed_fields
from qwen3vl.model.interop.assemble_parts import open_llm, open_vision
from qwen3vl.model.interop.assemble_weights import FRESH, INIT_STD, LLM, VISION, assembly_mappings, fresh_tensor
from qwen3vl.model.interop.hf_checkpoint import CheckpointMismatchError
from qwen3vl.model.interop.mapped_tensors import MappedTensors
from qwen3vl.model.interop.mcore_checkpoint import DTYPES, dtype_name, write_checkpoint_architecture

REPORT_FILE = "assembled_from.json"


def _groups(names: Sequence[str], prefix: str) -> list[str]:
    """Names summarised by their first component under the part's prefix, with counts."""
    counts = Counter(prefix + n[len(prefix):].split(".")[0] if n.startswith(prefix) else n.split(".")[0]
                     for n in names)
    return [f"{head}.* ({count})" for head, count in sorted(counts.items())]


def assemble(llm_dir: str | os.PathLike, vision_dir: str | os.PathLike, out_dir: str | os.PathLike,
             preset: Optional[str] = None, *, rope_theta: Optional[float] = None,
             mrope_section: Optional[Sequence[int]] = None,
             deepstack_visual_indexes: Optional[Sequence[int]] = None, dtype: str = "auto", seed: int = 0,
             workers: int = 1) -> Path:
    out = new_output_dir(out_dir)
    llm, vision = open_llm(llm_dir), open_vision(vision_dir)
    config = assembled_config(llm.config, vision.config, preset, name=Path(out).name, rope_theta=rope_theta,
                              mrope_section=mrope_section, deepstack_visual_indexes=deepstack_visual_indexes)
    mappings = assembly_mappings(config, vision.prefix)
    parts = {LLM: llm, VISION: vision}
    sources = [name.split("/", 1) for m in mappings for name in m.theirs]
    missing = [f"{tag}: {name}" for tag, name in sources if tag in parts and name not in parts[tag].tensors]
    if missing:
        raise CheckpointMismatchError("the parts lack weights Qwen3-VL needs:\n  " + "\n  ".join(missing[:20]))

    def read(names: Sequence[str]):
        tagged = [n.split("/", 1) for n in names]
        return [fresh_tensor(name, config, seed) if tag == FRESH else parts[tag].read(name) for tag, name in tagged]

    param_dtype = DTYPES[dtype] if dtype != "auto" else llm.dtype
    source = MappedTensors(mappings, read, config, direction="ours", keep=2 * workers)
    save_dist_checkpoint(out, source, param_dtype, workers)
    write_checkpoint_architecture(out, config, param_dtype)

    used = {(tag, name) for tag, name in sources}
    fresh = [name for tag, name in sources if tag == FRESH]
    unused = {tag: sorted(n for n in part.tensors if (tag, n) not in used) for tag, part in parts.items()}
    report = dict(llm=str(Path(llm_dir).resolve()), vision=str(Path(vision_dir).resolve()), preset=preset,
                  seed=seed, init=f"Linear weights N(0, {INIT_STD}^2), biases 0, LayerNorm weight 1, bias 0",
                  fresh=fresh, unused_llm=unused[LLM], unused_vision=unused[VISION],
                  differs_from_preset=changed_fields(config, preset) if preset else [])
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    carried = Counter(tag for tag, _ in sources if tag != FRESH)
    side = config.vision.position_grid_side
    lines = [
        f"wrote {out} ({dtype_name(param_dtype)}) from {llm_dir} + {vision_dir}",
        f"carried: {carried[LLM]} LLM tensors as they are; {carried[VISION]} vision tensors (q/k/v fused, patch "
        f"embedding as the Conv3d over 2 frames, positions resampled to {side}x{side})",
        f"new (seed {seed}; {report['init']}): " + ", ".join(fresh),
        "not used from the LLM: " + (", ".join(_groups(unused[LLM], "")) or "nothing"),
        "not used from the vision tower: " + (", ".join(_groups(unused[VISION], vision.prefix)) or "nothing"),
    ]
    if report["differs_from_preset"]:
        lines.append(f"differs from preset {preset}: " + ", ".join(report["differs_from_preset"]))
    print("\n".join(lines))
    return out

"""The README's main command: the whole pipeline on the tiny model, on 2 CPU ranks, in a few minutes.

    python -m qwen3vl.launch.demo --out DIR

1. builds the demo corpus (``qwen3vl-data demo``): shapes with captions, moving-shape videos,
   interleaved and text documents, plus held-out shape/colour combinations never trained on;
2. S0 (only the mergers train) -> S1 (everything) -> S2 (context parallel over the 2 ranks, short),
   each with ``qwen3vl-launch --nproc 2 --recipe <stage> -- model=tiny data=demo ...`` and each
   starting from the previous stage's weights (``init_from``); every run directory gets
   ``metrics.jsonl`` and ``loss.png``;
3. exports S2 to Hugging Face (``qwen3vl-convert mcore-to-hf``), loads it with transformers and
   captions the 9 held-out demo images; the last line counts the correct ones.

Each step is the public command a user would type; they are printed before they run.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from qwen3vl.train.metrics import METRICS_FILE, plot_loss, read_events, read_metrics


@dataclass(frozen=True)
class Stage:
    name: str  # run directory name
    recipe: str
    steps: int  # the stage's token budget is steps x batch tokens: the schedule's horizon
    seq: int  # row length
    batch: int  # tokens per step
    overrides: tuple[str, ...] = ()


# What the demo tunes for a CPU (never the architecture): pictures shrunk to 96x96 pixels (3x3 merged
# tokens, one per position the captions name), video frames to 64x64, and the stages' sizes below.
PROCESSING = {"min_pixels": 96 * 96, "max_pixels": 96 * 96, "video_min_pixels": 4 * 64 * 64,
              "video_max_pixels": 8 * 64 * 64}
COMMON = ("model=tiny", "data=demo", "train.recompute.granularity=null",
          *(f"+data.processing.{k}={v}" for k, v in PROCESSING.items()))
# The corpus's subsets, mostly captions: the demo is judged on captions, and the interleaved documents
# and videos still show colours, shapes and positions in context (the held-out subset never trains).
MIX = {"caption": 12.0, "interleaved": 2.0, "video": 1.0, "text": 1.0}
# Captioned pictures in the corpus: ten per training combination. With the default 240 (three each) the model
# learns the training pictures' combinations and names held-out ones from them (measured: held-out loss
# rises while the training loss falls); with ten times the pictures it names colour, shape and position.
CAPTIONS = 2400
S1_LR = ("optim.lr.llm=2e-3", "optim.lr.merger=2e-3", "optim.lr.vision=5e-3")
STAGES = (
    # S0: the LLM is random here (the demo has no pretrained parts), so aligning the mergers to it teaches
    # little: a short stage, to run it. S0 and S1 run as data parallelism on the two CPU ranks (the
    # recipes' CP2 is there for the 8B's activations on 80 GB GPUs).
    Stage("s0_align", "stage0_align", 10, 1024, 4096, ("parallel.cp=1", "optim.lr.merger=3e-3")),
    # S1: many small steps (1,024 tokens, about 50 pictures each) at a rate held until the last tenth
    # (warmup-stable-decay): the caption's words follow the picture only after the language prior is learnt,
    # which takes the first ~100 steps, and a decay starting early leaves too few updates at full rate. The
    # ViT learns the shapes last, so it gets the highest rate (measured: 4/9 held-out captions right with
    # 2e-3 for it, the shape wrong in all five misses; 7/9 with 5e-3; docs/benchmarks.md).
    Stage("s1_mm", "stage1_mm", 400, 512, 1024, ("parallel.tp=1", "parallel.cp=1",
                                                 "parallel.sequence_parallel=false", "schedule.decay_style=wsd",
                                                 *S1_LR)),
    # S2: there to run the stage under context parallelism (one 2,048-token row split over the two ranks per
    # micro-batch), not to teach more: 4 short steps at a low rate.
    Stage("s2_long", "stage2_32k", 4, 2048, 4096, ("parallel.tp=1", "parallel.cp=2", "parallel.sequence_parallel=false",
                                                   "optim.lr.llm=2e-4", "optim.lr.merger=2e-4", "optim.lr.vision=2e-4")),
)
WARMUP_FRACTION = 0.1
EVALS_PER_STAGE = 4  # held-out evaluations inside each stage, besides those at its start and end


def run(cmd: list[str]) -> None:
    print("+ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def mix_override(data_dir: Path) -> str:
    """``data.datasets`` listing the demo corpus's training subsets with the demo's weights (``MIX``)."""
    from qwen3vl.data.demo import read_manifest  # lazy: it imports torch, which this parent process needs only to caption

    subsets = read_manifest(data_dir)["subsets"]
    items = ", ".join(f"{{name: {name}, shards: '{subsets[name]['pattern']}', weight: {weight}}}"
                      for name, weight in MIX.items())
    return f"data.datasets=[{items}]"


def stage_command(stage: Stage, out: Path, data_dir: Path, nproc: int, init_from: Path | None,
                  steps_scale: float) -> list[str]:
    steps = max(1, round(stage.steps * steps_scale))
    overrides = [*COMMON, mix_override(data_dir), f"run_dir={out / stage.name}", f"data.demo_dir={data_dir}",
                 f"train.seq_length={stage.seq}", f"train.global_batch_tokens={stage.batch}",
                 f"train.token_budget={steps * stage.batch}", f"train.save_interval={steps}",
                 f"schedule.warmup_fraction={WARMUP_FRACTION}",
                 f"eval.interval={max(1, steps // EVALS_PER_STAGE)}", *stage.overrides]
    if init_from is not None:
        overrides.append(f"init_from={init_from}")
    return [sys.executable, "-m", "qwen3vl.launch.launcher", "--nproc", str(nproc), "--recipe", stage.recipe,
            "--", *overrides]


def plot_all_stages(out: Path) -> Path:
    """One loss curve over S0 -> S1 -> S2 (steps numbered on): ``<out>/metrics.jsonl`` and ``<out>/loss.png``."""
    offset, lines = 0, []
    for stage in STAGES:
        records = read_metrics(out / stage.name)
        lines += [json.dumps({**r, "step": r["step"] + offset, "stage": stage.name}) for r in records]
        # The held-out evaluations of the stage (its start, every few steps, its end): points on the curve.
        lines += [json.dumps({**e, "step": e["step"] + offset, "stage": stage.name})
                  for e in read_events(out / stage.name) if e["event"] == "eval"]
        offset += max((r["step"] for r in records), default=0)
    (out / METRICS_FILE).write_text("\n".join(lines) + "\n")
    return plot_loss(out)


def caption_heldout(hf_dir: Path, data_dir: Path, processing: dict, max_new_tokens: int = 16) -> list[tuple[str, str]]:
    """(generated caption, true caption) of every held-out demo image, with the exported model in transformers.

    The images go through the processing the stages trained with (``processing``: ProcessingConfig fields).
    """
    import torch  # lazy: only the final captioning needs torch
    from transformers import Qwen3VLForConditionalGeneration  # lazy: the convert extra, only for captioning

    from qwen3vl.data.batch import IGNORE_INDEX  # lazy: only the final captioning needs torch
    from qwen3vl.data.demo import read_manifest  # lazy: only the final captioning needs torch
    from qwen3vl.data.encode import SampleEncoder  # lazy: only the final captioning needs torch
    from qwen3vl.data.processing_config import ProcessingConfig  # lazy: only the final captioning needs torch
    from qwen3vl.data.shards import expand_shards, read_shard  # lazy: only the final captioning needs torch
    from qwen3vl.data.tokenizer import load_tokenizer  # lazy: only the final captioning needs torch

    manifest = read_manifest(data_dir)
    records = [r for url in expand_shards(manifest["subsets"]["heldout"]["pattern"]) for r in read_shard(url)
               if hasattr(r, "meta")]
    tokenizer = load_tokenizer()
    encoder = SampleEncoder(tokenizer, ProcessingConfig(**processing))
    stops = (tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|endoftext|>"))
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    results = []
    for raw in records:
        sample = encoder.encode(raw)[0]
        first_target = int(torch.nonzero(sample.labels != IGNORE_INDEX)[0])  # the prompt ends here
        prompt = slice(0, first_target + 1)
        with torch.no_grad():
            generated = model.generate(
                input_ids=sample.tokens[prompt][None], attention_mask=torch.ones_like(sample.tokens[prompt])[None],
                mm_token_type_ids=sample.mm_token_type_ids[prompt][None], pixel_values=sample.pixel_values,
                image_grid_thw=sample.grid_thw, max_new_tokens=max_new_tokens, do_sample=False)
        new = generated[0, first_target + 1:].tolist()
        end = next((i for i, t in enumerate(new) if t in stops), len(new))
        results.append((tokenizer.decode(new[:end]).strip(), raw.meta.get("text", "")))
    return results


def report_captions(results: list[tuple[str, str]]) -> int:
    """Prints each held-out caption with the truth; returns how many state colour, shape and position right."""
    from qwen3vl.data.demo import parse_caption  # lazy: qwen3vl.data.demo imports torch

    correct = 0
    for caption, truth in results:
        ok = parse_caption(caption) is not None and parse_caption(caption) == parse_caption(truth)
        correct += ok
        print(f"  {'ok   ' if ok else 'wrong'} truth {truth!r:40} model {caption!r}", flush=True)
    print(f"held-out captions correct: {correct}/{len(results)}", flush=True)
    return correct


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen3vl.launch.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the corpus, the three runs and the export")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (CPU processes); S2 uses them for CP")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps (e.g. 0.1)")
    parser.add_argument("--skip-caption", action="store_true", help="stop after the export")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    data_dir = out / "data"
    if not (data_dir / "manifest.json").is_file():
        run([sys.executable, "-m", "qwen3vl.data.cli", "demo", "--out", str(data_dir), "--captions", str(CAPTIONS)])
    init_from = None
    for stage in STAGES:
        run(stage_command(stage, out, data_dir, args.nproc, init_from, args.steps_scale))
        init_from = out / stage.name
        print(f"{stage.name}: loss plot {init_from / 'loss.png'}", flush=True)
    print(f"all stages: loss plot {plot_all_stages(out)}", flush=True)
    hf_dir = out / "hf"
    run([sys.executable, "-m", "qwen3vl.launch.convert", "mcore-to-hf", "--ckpt", str(init_from), "--out", str(hf_dir)])
    if not args.skip_caption:
        report_captions(caption_heldout(hf_dir, data_dir, PROCESSING))
    return 0


if __name__ == "__main__":
    sys.exit(main())

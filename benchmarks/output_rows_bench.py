"""CPU timing of one forward + backward when only the labelled rows reach the output layer (the model's loss
path) against projecting every row onto the vocabulary and masking the loss afterwards (what the model did
before, and what megatron's GPT model does), on the same model and the same packed row, in one process
(world size 1, gloo).

    python benchmarks/output_rows_bench.py --hidden 256 --image 448 --caption-tokens 40 --samples 8
    torchrun --nproc-per-node 2 benchmarks/output_rows_bench.py --tp 2 --threads 1   # TP2 + sequence parallel

With ``--tp N`` (under torchrun, N processes) the model is tensor parallel with sequence parallelism, the
recipes' layout: each rank then projects as many rows as the sequence share with the most labels has.

The row is ``--samples`` caption samples (one ``--image`` picture, then ``--caption-tokens`` of text with a
label each): S0's kind of data, where the visual tokens, which have no label, are most of the row. Both
losses are checked to agree first; then the steps are interleaved, the order swapped every round, and the
medians compared. The last line printed is ``ratio=<labelled rows / all rows>``.
Not a test: timings depend on the machine (results and machine go in docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from megatron.core import tensor_parallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))  # qwen3vl_testing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # model_bench

from model_bench import CLOCKS, Contender, bench_config, time_interleaved  # noqa: E402

from qwen3vl.model.build import build_model_chunks  # noqa: E402
from qwen3vl.parallel.context_parallel import model_inputs  # noqa: E402
from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel  # noqa: E402
from qwen3vl.parallel.layout import ParallelLayout  # noqa: E402
from qwen3vl_testing.model_cases import SampleBuilder, pack_samples  # noqa: E402

LOSS_TOL = 1e-5  # relative: the same cross entropy over the same rows, summed in another order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="LLM hidden size")
    parser.add_argument("--layers", type=int, default=4, help="LLM layers")
    parser.add_argument("--vit-depth", type=int, default=2, help="ViT blocks")
    parser.add_argument("--vit-hidden", type=int, default=256, help="ViT hidden size")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (the released one by default)")
    parser.add_argument("--image", type=int, default=448, help="each sample's picture side in pixels (x32)")
    parser.add_argument("--caption-tokens", type=int, default=40, help="each sample's labelled text tokens")
    parser.add_argument("--samples", type=int, default=8, help="caption samples packed into the row")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per path (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor parallel with sequence parallelism over this many torchrun processes")
    args = parser.parse_args()
    if args.image % 32:
        parser.error("--image must be a multiple of 32 (16-pixel patches merged 2 x 2)")
    if args.threads:
        torch.set_num_threads(args.threads)

    sequence_parallel = args.tp > 1
    initialize_parallel(ParallelLayout(tp=args.tp, sequence_parallel=sequence_parallel))
    config = bench_config(args.hidden, args.layers, args.vit_depth, args.vit_hidden, args.vocab)
    patches = args.image // config.vision.patch_size
    samples = [SampleBuilder(config, seed=i).image(patches, patches).text(args.caption_tokens).build()
               for i in range(args.samples)]
    inputs = model_inputs(pack_samples(samples, pad_multiple=args.tp))
    # As the sample encoder labels a caption: no loss at the visual tokens or on predicting one (the test
    # builder labels every next token).
    visual_ids = torch.tensor([config.image_token_id, config.vision_start_token_id, config.vision_end_token_id])
    inputs.labels.masked_fill_((inputs.visual_index >= 0) | torch.isin(inputs.labels, visual_ids), -100)
    labelled = int((inputs.labels >= 0).sum())
    [model] = build_model_chunks(config, moe_aux_loss_coeff=0.0, sequence_parallel=sequence_parallel)
    model.train()
    kwargs = inputs.model_kwargs()

    def labelled_rows() -> float:
        loss = model(**kwargs).sum() / labelled
        loss.backward()
        return loss.item()

    def all_rows() -> float:
        labels = kwargs["labels"]
        logits = model(**{**kwargs, "labels": None})  # [T, V]: every row projected
        ignored = labels < 0
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.unsqueeze(1),
                                                                 labels.masked_fill(ignored, 0).unsqueeze(1))
        loss = per_token.squeeze(1).float().masked_fill(ignored, 0.0).sum() / labelled
        loss.backward()
        return loss.item()

    selected, every = Contender("labelled rows", labelled_rows, model), Contender("all rows", all_rows, model)

    projected = []  # rows this rank hands the output layer in the labelled-rows path
    hook = model.output_layer.register_forward_pre_hook(lambda module, args: projected.append(args[0].shape[0]))
    labelled_rows()
    hook.remove()
    model.zero_grad()
    say(f"config: hidden {args.hidden}, layers {args.layers}, ViT depth {args.vit_depth} x {args.vit_hidden}, "
        f"vocab {args.vocab}; row: {args.samples} x ({args.image}x{args.image} image + {args.caption_tokens} "
        f"text) = {inputs.labels.numel()} tokens, {labelled} labelled; tp {args.tp}"
        f"{' with sequence parallelism' if sequence_parallel else ''}, rows into the output layer per rank: "
        f"{projected[0]} (all rows: {inputs.labels.numel() // args.tp}); threads {torch.get_num_threads()}")
    (_, a), (_, b) = selected.run(), every.run()  # warm-up, and the loss check
    if abs(a - b) > LOSS_TOL * abs(b):
        raise SystemExit(f"losses disagree: labelled rows {a:.7f} vs all rows {b:.7f}; not timing")
    say(f"loss: labelled rows {a:.7f}  all rows {b:.7f}")
    medians = time_interleaved((selected, every), args.repeats, args.clock, quiet=not is_first_rank())
    say(f"ratio={medians[selected.name] / medians[every.name]:.3f}")
    destroy_parallel(shutdown_distributed=True)


def is_first_rank() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def say(line: str) -> None:
    """Rank 0 speaks for all (under --tp every rank times the same collective steps)."""
    if is_first_rank():
        print(line, flush=True)

if __name__ == "__main__":
    main()

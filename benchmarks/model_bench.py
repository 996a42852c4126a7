"""CPU timing of one training step's forward + backward: our megatron Qwen3-VL against transformers'
``Qwen3VLForConditionalGeneration`` built with the same config and the same weights, on one sample
(one image + text), in one process (world size 1, gloo).

    python benchmarks/model_bench.py --hidden 256 --layers 4 --vit-depth 4 --image 448 --text-tokens 1024

Both losses are checked to agree first (a benchmark of two different computations would mean nothing).
After warm-up the steps are interleaved, the order swapped every round (ours, reference, reference, ours,
...), so slow drift of a shared machine's load hits both alike; the medians are compared.
``--clock cpu`` times the process's CPU time instead of wall time, for a machine shared with other work.
The last line printed is ``ratio=<ours / reference>``.
Not a test: timings depend on the machine (results and machine go in docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))  # qwen3vl_testing

from qwen3vl.data.batch import IMAGE
from qwen3vl.model.config import Qwen3VLConfig, TextConfig, VisionConfig

# Loss agreement required before timing: both are fp32 means of the same cross entropy.
LOSS_TOL = 1e-4
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def bench_config(hidden: int, layers: int, vit_depth: int, vit_hidden: int, vocab: int) -> Qwen3VLConfig:
    """A scaled-down Qwen3-VL with the released shapes' ratios: head dim 64, GQA 2:1, FFN 3x (LLM) / 4x (ViT),
    DeepStack from the first three ViT blocks, the released 48 x 48 position table and vocabulary."""
    head_dim = 64
    heads = max(2, hidden // head_dim)
    # A smaller vocabulary (to time the model without its output layer dominating) keeps the four vision
    # token ids at its top; the released ids need the released vocabulary.
    special = {} if vocab >= 151936 else dict(vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 3,
                                              image_token_id=vocab - 2, video_token_id=vocab - 1)
    return Qwen3VLConfig(
        name="bench",
        vision=VisionConfig(depth=vit_depth, hidden_size=vit_hidden, intermediate_size=4 * vit_hidden,
                            num_heads=max(1, vit_hidden // 64), out_hidden_size=hidden,
                            deepstack_visual_indexes=tuple(range(min(3, vit_depth, layers)))),
        text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=head_dim,
                        mrope_section=(12, 10, 10)),  # the released 24:20:20, halved with the head dim
        tie_word_embeddings=False, **special,
    ).validate()


@dataclass
class Contender:
    """One model's training step on the sample; ``step`` returns the mean token loss after its backward."""

    name: str
    step: Callable[[], float]
    model: torch.nn.Module

    def run(self, clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
        """(seconds of ``clock`` the step took, its loss)."""
        self.model.zero_grad(set_to_none=True)
        start = clock()
        loss = self.step()
        return clock() - start, loss


def time_interleaved(contenders: tuple[Contender, Contender], repeats: int, clock: str,
                     quiet: bool = False) -> dict[str, float]:
    """Times ``repeats`` steps of each contender, alternating who goes first (so neither always runs right
    after the other's allocations); prints (unless ``quiet``) each one's median, min and max and returns the
    medians by name."""
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for i in range(repeats):
        for contender in contenders if i % 2 == 0 else contenders[::-1]:
            times[contender.name].append(contender.run(CLOCKS[clock])[0])
    medians = {name: statistics.median(t) for name, t in times.items()}
    width = max(len(name) for name in times)
    for name, t in ([] if quiet else times.items()):
        print(f"{name:>{width}}: {clock} median {medians[name] * 1e3:.0f} ms  "
              f"(min {min(t) * 1e3:.0f}, max {max(t) * 1e3:.0f}, n={len(t)})")
    return medians


def build_contenders(config: Qwen3VLConfig, image: int, text_tokens: int) -> tuple[Contender, Contender, int]:
    from qwen3vl.model.build import build_model_chunks
    from qwen3vl.model.interop.hf_reference import build_hf_model
    from qwen3vl.model.interop.hf_weights import hf_to_mcore_state_dict
    from qwen3vl.model.interop.state_dict_sharding import load_full_state_dict
    from qwen3vl_testing.model_cases import SampleBuilder, pack_samples
    from qwen3vl.parallel.context_parallel import model_inputs

    patches = image // config.vision.patch_size
    half = text_tokens // 2
    sample = SampleBuilder(config, seed=0).text(half).image(patches, patches).text(text_tokens - half).build()
    inputs = model_inputs(pack_samples([sample]))
    predicted = int((inputs.labels >= 0).sum())

    reference = build_hf_model(config).train()  # transformers' defaults: sdpa attention, fp32
    [ours] = build_model_chunks(config, moe_aux_loss_coeff=0.0)
    load_full_state_dict(ours, hf_to_mcore_state_dict(reference.state_dict(), config))
    ours.train()

    def ours_step() -> float:
        loss = ours(**inputs.model_kwargs()).sum() / predicted
        loss.backward()
        return loss.item()

    # transformers shifts ``labels`` itself and averages over the predicted tokens (its standard training path).
    hf_kwargs = dict(input_ids=sample.input_ids[None], mm_token_type_ids=sample.mm_token_type_ids[None],
                     pixel_values=sample.pixels(IMAGE), image_grid_thw=sample.grids(IMAGE),
                     labels=sample.input_ids[None])

    def reference_step() -> float:
        loss = reference(**hf_kwargs).loss
        loss.backward()
        return loss.item()

    return Contender("ours", ours_step, ours), Contender("transformers", reference_step, reference), \
        sample.input_ids.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="LLM hidden size")
    parser.add_argument("--layers", type=int, default=4, help="LLM layers")
    parser.add_argument("--vit-depth", type=int, default=4, help="ViT blocks")
    parser.add_argument("--vit-hidden", type=int, default=256, help="ViT hidden size")
    parser.add_argument("--vocab", type=int, default=151936,
                        help="vocabulary; below 151936 the vision token ids move to its top (>= 5004: the random "
                             "text ids are < 5000)")
    parser.add_argument("--image", type=int, default=448, help="image side in pixels (multiple of 32)")
    parser.add_argument("--text-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (>= 1: the loss "
                                                                   "check runs on them)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall: elapsed time (a quiet machine); cpu: this process's CPU time, which other "
                             "processes' load barely changes (use with --threads 1 on a shared machine)")
    args = parser.parse_args()
    if args.image % 32:
        parser.error("--image must be a multiple of 32 (16-pixel patches merged 2 x 2)")
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from qwen3vl.parallel.groups import destroy_parallel, initialize_parallel
    from qwen3vl.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout())
    config = bench_config(args.hidden, args.layers, args.vit_depth, args.vit_hidden, args.vocab)
    ours, reference, tokens = build_contenders(config, args.image, args.text_tokens)
    print(f"config: hidden {args.hidden}, layers {args.layers}, ViT depth {args.vit_depth} x {args.vit_hidden}, "
          f"vocab {args.vocab}; sample: {args.image}x{args.image} image + {args.text_tokens} text = {tokens} tokens; "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")

    for _ in range(args.warmup):
        (_, loss_ours), (_, loss_ref) = ours.run(), reference.run()
    if abs(loss_ours - loss_ref) > LOSS_TOL:
        raise SystemExit(f"losses disagree: ours {loss_ours:.6f} vs transformers {loss_ref:.6f}; not timing")
    print(f"loss: ours {loss_ours:.6f}  transformers {loss_ref:.6f}")

    medians = time_interleaved((ours, reference), args.repeats, args.clock)
    destroy_parallel(shutdown_distributed=True)
    print(f"ratio={medians[ours.name] / medians[reference.name]:.3f}")


if __name__ == "__main__":
    main()

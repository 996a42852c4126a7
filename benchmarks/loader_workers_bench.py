"""Rows per second of the loader with its rows built in worker processes against built in the trainer's
process, on the same corpus, in one run: what the trainer's default (``data.num_workers=2``) gets per
worker core, against ``qwen3vl-data bench``'s in-process rate.

    python benchmarks/loader_workers_bench.py --kind caption --rows 24 --rounds 3

Each round times ``--rows`` packed rows of ``--seq-length`` tokens from a fresh loader with
``num_workers=0`` and one with ``--workers`` workers, the order swapped every round, after a warm-up of
``--warmup`` rows (the packer's first fill, the workers' start). The trainer side reads every row's pixels
(as the copy to the GPU does) and then drops the row, as the training loop does. Wall time: a worker runs
on its own core, so on a machine with at least ``--workers + 1`` idle cores wall time is the rate the
trainer sees. The corpus is ``qwen3vl-data bench``'s (``--kind``: caption, interleaved, text, video, or mix).
Prints each round, then the medians; the last line is ``ratio=<workers' rate / in-process rate>``.
Not a test: timings depend on the machine (results and machine go in docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

import torch

from qwen3vl.data.batch import PATCH_DIM
from qwen3vl.data.bench import write_bench_corpus
from qwen3vl.data.loader import LoaderConfig, build_loader


def time_rows(pattern: str, *, workers: int, rows: int, warmup: int, seq_length: int) -> dict:
    loader = build_loader(LoaderConfig(datasets=[(pattern, 1.0)]), seq_length=seq_length, num_workers=workers)
    try:
        for _ in range(warmup):
            next(loader)
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        tokens = patches = 0
        for _ in range(rows):
            batch = next(loader)
            tokens += int(batch.cu_seqlens[-1])  # the row's tokens, without its padding
            patches += batch.pixel_values.shape[0]
            float(batch.pixel_values.sum())  # read every pixel, as the copy to the GPU does
            del batch
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        loader.close()
    return {"wall_s": wall, "tokens_per_s": tokens / wall, "trainer_cpu_s": (after.ru_utime - before.ru_utime)
            + (after.ru_stime - before.ru_stime), "mib_per_row": patches * PATCH_DIM * 4 / rows / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="caption", choices=("caption", "interleaved", "text", "video", "mix"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=400, help="samples in the generated corpus")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the data bench and each worker: one core for the rows
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_bench_corpus(tmp, samples=args.samples, kind=None if args.kind == "mix" else args.kind)
        rates: dict[int, list[float]] = {0: [], args.workers: []}
        for r in range(args.rounds):
            for workers in (0, args.workers) if r % 2 == 0 else (args.workers, 0):
                got = time_rows(pattern, workers=workers, rows=args.rows, warmup=args.warmup,
                                seq_length=args.seq_length)
                rates[workers].append(got["tokens_per_s"])
                print(f"round {r} workers={workers}: {got['tokens_per_s']:,.0f} tokens/s, {got['wall_s']:.2f} s, "
                      f"trainer CPU {got['trainer_cpu_s']:.2f} s, {got['mib_per_row']:.0f} MiB of pixels a row",
                      flush=True)
    medians = {w: statistics.median(v) for w, v in rates.items()}
    print(f"median: in-process {medians[0]:,.0f} tokens/s, {args.workers} worker(s) {medians[args.workers]:,.0f}")
    print(f"ratio={medians[args.workers] / medians[0]:.3f}")


if __name__ == "__main__":
    main()

"""``qwen3vl-data``: build shards, write the demo corpus, inspect shards, benchmark the pipeline.

    qwen3vl-data build --llava FILE.json --image-root DIR --out DIR [--samples-per-shard N | --bytes-per-shard N]
    qwen3vl-data build --jsonl FILE.jsonl --out DIR
    qwen3vl-data build --image-folder DIR --out DIR
    qwen3vl-data demo --out DIR [--seed S] [--captions N]
    qwen3vl-data inspect SHARDS... [--json]
    qwen3vl-data bench [--seq-length 8192] [--json]
    qwen3vl-data trace-summary RUN_DIR [--json]

With ``--json`` the last line of the output is one JSON object (for scripts and CI).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path


def input_errors() -> tuple[type[BaseException], ...]:
    """Wrong input (missing or unreadable files, malformed sources, broken datasets): the message says it all."""
    from qwen3vl.data.dataset_errors import DatasetError  # lazy: webdataset imports torch; --help stays instant
    from qwen3vl.data.robust import TooManyBadSamples  # lazy: imports torch; --help stays instant

    return OSError, json.JSONDecodeError, UnicodeDecodeError, DatasetError, TooManyBadSamples


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _build(args) -> dict:
    from qwen3vl.data import build  # lazy: imports torch; --help stays instant

    if args.llava:
        if not args.image_root:
            raise SystemExit("--llava needs --image-root (the folder the entries' image paths are relative to)")
        samples = build.llava_samples(Path(args.llava), Path(args.image_root))
    elif args.jsonl:
        samples = build.jsonl_samples(Path(args.jsonl), args.text_field)
    else:
        samples = build.image_folder_samples(Path(args.image_folder))
    max_samples = None if args.bytes_per_shard else args.samples_per_shard
    report = build.write_samples(samples, args.out, prefix=args.prefix, max_samples=max_samples,
                                 max_bytes=args.bytes_per_shard)
    skipped = ", ".join(f"{k} {n}" for k, n in report.skipped.items()) or "none"
    print(f"wrote {report.samples} samples into {len(report.shards)} shards under {args.out}; skipped: {skipped}")
    return report.as_dict()


def _demo(args) -> dict:
    from qwen3vl.data.demo import write_demo  # lazy: imports torch; --help stays instant

    manifest = write_demo(args.out, seed=args.seed, captions=args.captions)
    for name, subset in manifest["subsets"].items():
        print(f"{name:12s} {subset['samples']:5d} samples  {subset['pattern']}")
    print(f"held-out combinations for the final captioning check: {len(manifest['heldout'])}; "
          f"manifest: {Path(args.out) / 'manifest.json'}")
    return manifest


def _inspect(args) -> dict:
    from qwen3vl.data.inspect_shards import format_report, inspect_shards  # lazy: imports torch; --help stays instant

    report = inspect_shards(args.shards, tokenizer_path=args.tokenizer, seq_length=args.seq_length, limit=args.limit)
    print(format_report(report))
    return report


def _bench(args) -> dict:
    from qwen3vl.data.bench import run_bench  # lazy: imports torch; --help stays instant

    result = run_bench(seq_length=args.seq_length, rows=args.rows, pack_buffer=args.pack_buffer,
                       corpus=args.corpus, samples=args.samples, by_kind=not args.corpus)
    print(f"{result['tokens_per_s_per_core']:.0f} tokens/s per core, packing efficiency "
          f"{100 * result['packing_efficiency']:.2f}% at {result['seq_length']} "
          f"({result['rows']} rows, {result['cpu_s']} CPU s)")
    if "by_kind" in result:
        print("by kind (tokens/s per core): " + ", ".join(f"{k} {v:.0f}" for k, v in result["by_kind"].items())
              + f"; decode floor of captions {result['decode_floor_tokens_per_s']:.0f} "
              f"(captions at {100 * result['caption_fraction_of_floor']:.0f}% of it)")
    return result


def _trace_summary(args) -> dict:
    from qwen3vl.data.trace import format_summary, summarize  # lazy: imports torch; --help stays instant

    report = summarize(args.run_dir)
    print(format_summary(report))
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen3vl-data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="convert LLaVA JSON, JSONL text or image+caption folders into shards")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--llava", help="LLaVA-style JSON list of conversations with image paths")
    src.add_argument("--jsonl", help="JSONL file, one {'text': ...} per line")
    src.add_argument("--image-folder", help="folder of NAME.jpg|png|webp with NAME.txt captions")
    b.add_argument("--image-root", help="folder the --llava image paths are relative to")
    b.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    b.add_argument("--out", required=True, help="output folder for the .tar shards")
    b.add_argument("--prefix", default="shard", help="shard file prefix (default: shard)")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=1000)
    size.add_argument("--bytes-per-shard", type=int, help="roll over before a shard exceeds this many bytes")
    b.set_defaults(run=_build)

    d = sub.add_parser("demo", help="write the small learnable demo corpus (shapes, videos, documents)")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--captions", type=int, default=240,
                   help="captioned pictures (spread evenly over the training combinations; more generalise better)")
    d.set_defaults(run=_demo)

    i = sub.add_parser("inspect", help="counts, histograms and skipped samples of shards")
    i.add_argument("shards", nargs="+", help="shard patterns, directories or URLs")
    i.add_argument("--seq-length", type=int, default=8192)
    i.add_argument("--limit", type=int, help="stop after this many samples")
    i.add_argument("--tokenizer", help="tokenizer path (default: the bundled Qwen vocabulary)")
    i.set_defaults(run=_inspect)

    r = sub.add_parser("bench", help="packed tokens/s per CPU core and packing efficiency on the standard mix")
    r.add_argument("--seq-length", type=int, default=8192)
    r.add_argument("--rows", type=int, default=48, help="packed rows to produce")
    r.add_argument("--pack-buffer", type=int, default=256)
    r.add_argument("--samples", type=int, default=200, help="samples in the generated corpus")
    r.add_argument("--corpus", help="use these shards instead of the generated standard mix")
    r.set_defaults(run=_bench)

    t = sub.add_parser("trace-summary", help="per dataset and epoch: samples seen once, twice, never (data.trace=true)")
    t.add_argument("run_dir", help="the run directory (holding data_trace/)")
    t.set_defaults(run=_trace_summary)

    for command in (b, d, i, r, t):
        command.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the command; a failure ends with one line naming its cause (exit 2: bad input, 1: a bug)."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    prog = f"qwen3vl-data {args.command}"
    try:
        result = args.run(args)
    except input_errors() as error:
        print(f"{prog}: error: {type(error).__name__}: {_one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except Exception as error:  # noqa: BLE001 - a bug: its traceback, then the one line
        traceback.print_exc()
        print(f"{prog}: failed: {type(error).__name__}: {_one_line(error)}", file=sys.stderr, flush=True)
        return 1
    if args.json:
        sys.stdout.flush()
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

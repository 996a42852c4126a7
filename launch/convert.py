"""``qwen3vl-convert``: Hugging Face <-> megatron dist checkpoints, and a numerical check of the pair.

    qwen3vl-convert hf-to-mcore --hf DIR --out CKPT [--dtype D] [--workers N]
    qwen3vl-convert mcore-to-hf --ckpt CKPT_OR_RUN_DIR --out DIR [--dtype D] [--workers N]
    qwen3vl-convert verify --hf DIR --ckpt CKPT [--tp N --pp N --ep N --cp N]
    qwen3vl-convert assemble --llm DIR --vision DIR [--preset NAME] --out CKPT

Both conversions stream tensor by tensor (memory stays at a few tensors whatever the model's depth).
``hf-to-mcore`` writes a megatron dist checkpoint, which dist checkpointing reshards on load, so
training and ``verify`` can read it under any layout. ``mcore-to-hf`` reads a converted checkpoint, a
training checkpoint (model part only, saved under any layout) or a run directory (its latest
checkpoint) and writes safetensors + config.json that transformers loads, without building the model.
``verify`` runs transformers' model and ours on one fixed multimodal sample and prints
``max_abs_diff=<float>`` as its last line. ``assemble`` builds a Qwen3-VL checkpoint from a pretrained
Qwen3 LLM and a SigLIP-2 vision tower (mergers fresh), the starting point of S0. See docs/conversion.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
import traceback

from qwen3vl.model.interop.hf_checkpoint import EXPERT_LAYOUTS
from qwen3vl.train.console import filter_known_warnings
from qwen3vl.train.failure_record import one_line, read_records, report_lines

FAILURE_DIR_ENV = "QWEN3VL_FAILURE_DIR"  # where the ranks of `verify` record why they failed

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _add_layout_flags(parser: argparse.ArgumentParser) -> None:
    for flag, what in (("tp", "tensor"), ("pp", "pipeline"), ("ep", "expert"), ("cp", "context")):
        parser.add_argument(f"--{flag}", type=int, default=1, help=f"{what}-parallel size of our model")
    parser.add_argument("--pipeline-layers", type=_int_list, default=None, metavar="N,N,...",
                        help="layers per pipeline stage when uneven (DeepStack needs the first 3 LLM "
                             "layers on stage 0), e.g. 3,1")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="sequence parallelism over the TP group (megatron needs it for MoE with tp > 1)")


def _add_workers_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_positive, default=1,
                        help="files written at once (threads); memory grows by a few tensors per worker")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3vl-convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    to_mcore = commands.add_parser("hf-to-mcore", help="Hugging Face directory -> megatron dist checkpoint")
    to_mcore.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    to_mcore.add_argument("--out", required=True, help="checkpoint directory to create")
    to_mcore.add_argument("--dtype", choices=_DTYPES, default="auto",
                          help="parameter dtype of the checkpoint (auto: the dtype of the HF weights)")
    _add_workers_flag(to_mcore)

    to_hf = commands.add_parser("mcore-to-hf", help="megatron dist checkpoint -> Hugging Face directory")
    to_hf.add_argument("--ckpt", required=True,
                       help="a converted checkpoint, a training checkpoint (iter_XXXXXXX) or a run "
                            "directory (its latest checkpoint)")
    to_hf.add_argument("--out", required=True, help="directory to write config.json + safetensors to")
    to_hf.add_argument("--dtype", choices=_DTYPES, default="auto",
                       help="dtype of the written weights (auto: the dtype the checkpoint records)")
    to_hf.add_argument("--expert-layout", choices=("auto",) + EXPERT_LAYOUTS, default="auto",
                       help="MoE expert tensors as transformers 5.x saves them (hf5: [E, 2I, H]) or as the "
                            "original release ([E, H, 2I]); auto: the layout the converted HF weights had "
                            "(hf5 for training checkpoints)")
    to_hf.add_argument("--max-shard-size", type=_size, default="5GB",
                       help="largest safetensors file, e.g. 5GB or 500MB")
    _add_workers_flag(to_hf)

    parts = commands.add_parser("assemble", help="Qwen3 LLM + SigLIP-2 vision tower -> megatron dist checkpoint "
                                                 "of Qwen3-VL (mergers fresh), the starting point of S0")
    parts.add_argument("--llm", required=True, help="Hugging Face Qwen3 or Qwen3-MoE causal-LM directory")
    parts.add_argument("--vision", required=True,
                       help="Hugging Face SigLIP-2 directory (the vision tower alone or a full SigLIP-2 model)")
    parts.add_argument("--out", required=True, help="checkpoint directory to create")
    parts.add_argument("--preset", default=None,
                       help="Qwen3-VL size to check the parts against and take the MRoPE split, DeepStack "
                            "indexes and position grid from (2B, 4B, 8B, 32B, 30B-A3B, 235B-A22B, tiny, ...)")
    parts.add_argument("--rope-theta", type=float, default=None, help="LLM rope theta (default: the LLM's)")
    parts.add_argument("--mrope-section", type=_int_list, default=None, metavar="T,H,W",
                       help="MRoPE frequencies per position row (required without --preset)")
    parts.add_argument("--deepstack-visual-indexes", type=_int_list, default=None, metavar="A,B,C",
                       help="ViT blocks feeding the DeepStack mergers (required without --preset)")
    parts.add_argument("--dtype", choices=_DTYPES, default="auto",
                       help="parameter dtype of the checkpoint (auto: the dtype of the LLM's weights)")
    parts.add_argument("--seed", type=int, default=0, help="seed of the fresh mergers")
    _add_workers_flag(parts)

    verify = commands.add_parser("verify", help="compare transformers' and our logits on a fixed sample")
    verify.add_argument("--hf", required=True, help="Hugging Face model directory")
    verify.add_argument("--ckpt", required=True, help="our checkpoint (converted, training, or run dir)")
    _add_layout_flags(verify)
    verify.add_argument("--dtype", choices=_DTYPES[1:], default="float32",
                        help="compute dtype of both models (float32 for a meaningful comparison)")
    # Internal: set when the command restarts itself under torchrun (one process per rank).
    verify.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    verify.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    return parser


def _size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 1000000")


@contextlib.contextmanager
def _without_gpu():
    """Conversions never need a GPU. Hidden before torch first looks, even the meta-device model build
    cannot place weights there (megatron does whenever it sees one); restored afterwards."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def run(args: argparse.Namespace) -> None:
    if args.command != "verify":
        with _without_gpu():
            return _convert(args)
    from qwen3vl.launch.convert_verify import verify_command  # lazy: megatron takes seconds; --help stays instant

    verify_command(args)


def _convert(args: argparse.Namespace) -> None:
    if args.command == "hf-to-mcore":
        from qwen3vl.launch.convert_commands import hf_to_mcore  # lazy: megatron takes seconds; --help stays instant

        hf_to_mcore(args.hf, args.out, dtype=args.dtype, workers=args.workers)
    elif args.command == "mcore-to-hf":
        from qwen3vl.launch.convert_commands import mcore_to_hf  # lazy: megatron takes seconds; --help stays instant

        mcore_to_hf(args.ckpt, args.out, dtype=args.dtype, expert_layout=args.expert_layout,
                    max_shard_bytes=args.max_shard_size, workers=args.workers)
    else:
        from qwen3vl.launch.convert_assemble import assemble  # lazy: megatron takes seconds; --help stays instant

        assemble(args.llm, args.vision, args.out, args.preset, rope_theta=args.rope_theta,
                 mrope_section=args.mrope_section, deepstack_visual_indexes=args.deepstack_visual_indexes,
                 dtype=args.dtype, seed=args.seed, workers=args.workers)


def main(argv: list[str] | None = None) -> None:
    """Runs the command; a failure ends with one line naming its cause (exit 2: wrong input, 1: other).

    ``verify`` on several ranks runs them under torchrun: each rank records its failure in the folder
    of ``$QWEN3VL_FAILURE_DIR`` (made here), and the line names the rank that failed first.
    """
    args = build_parser().parse_args(argv)
    filter_known_warnings()  # megatron's apex/TE notes and torch's checkpoint deprecations, as in training
    from qwen3vl.launch.convert_commands import user_errors  # lazy: megatron takes seconds; --help stays instant

    prog, worker = f"qwen3vl-convert {args.command}", getattr(args, "worker", False)
    own_dir = None if worker or FAILURE_DIR_ENV in os.environ else tempfile.mkdtemp(prefix="qwen3vl-convert-")
    if own_dir is not None:
        os.environ[FAILURE_DIR_ENV] = own_dir  # inherited by the ranks torchrun starts
    started = time.time()
    try:
        run(args)
    except user_errors() as error:
        _end(worker, prog, error, f"{prog}: error: {one_line(str(error))}", code=2)
    except SystemExit as stop:
        if stop.code not in (0, None) and not worker:  # the ranks failed: say which and why
            lines = report_lines(read_records(os.environ[FAILURE_DIR_ENV], since=started), prog)
            print("\n".join(lines or [f"{prog}: failed with exit code {stop.code}"]), file=sys.stderr, flush=True)
        raise
    except Exception as error:  # noqa: BLE001 - a bug: its traceback, then the one line
        traceback.print_exc()
        _end(worker, prog, error, f"{prog}: failed: {type(error).__name__}: {one_line(str(error))}", code=1)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
            os.environ.pop(FAILURE_DIR_ENV, None)


def _end(worker: bool, prog: str, error: Exception, line: str, code: int) -> None:
    from qwen3vl.train.rank_failure import record_exception  # lazy: imports megatron (seconds)

    if worker:  # a rank under torchrun: its record tells the parent command
        record_exception(os.environ[FAILURE_DIR_ENV], error)
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":  # dist checkpointing's save spawns a Manager that re-imports __main__
    main()

"""``qwen3vl-convert``: Hugging Face <-> megatron dist checkpoints, and a numerical check of the pair.

    qwen3vl-convert hf-to-mcore --hf DIR --out CKPT
    qwen3vl-convert mcore-to-hf --ckpt CKPT_OR_RUN_DIR --out DIR
    qwen3vl-convert verify --hf DIR --ckpt CKPT [--tp N --pp N --ep N --cp N]

``hf-to-mcore`` builds the model on one CPU rank and writes a megatron dist checkpoint, which
dist checkpointing reshards on load, so training and ``verify`` can read it under any layout.
``mcore-to-hf`` reads a converted checkpoint, a training checkpoint (model part only) or a run
directory (its latest checkpoint) and writes safetensors + config.json that transformers loads.
``verify`` runs transformers' model and ours on one fixed multimodal sample and prints
``max_abs_diff=<float>`` as its last line. See docs/conversion.md.
"""
from __future__ import annotations

import argparse
import sys

from qwen3vl.model.hf_checkpoint import EXPERT_LAYOUTS

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _add_layout_flags(parser: argparse.ArgumentParser) -> None:
    for flag, what in (("tp", "tensor"), ("pp", "pipeline"), ("ep", "expert"), ("cp", "context")):
        parser.add_argument(f"--{flag}", type=int, default=1, help=f"{what}-parallel size of our model")
    parser.add_argument("--pipeline-layers", type=_int_list, default=None, metavar="N,N,...",
                        help="layers per pipeline stage when uneven (DeepStack needs the first 3 LLM "
                             "layers on stage 0), e.g. 3,1")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="sequence parallelism over the TP group (megatron needs it for MoE with tp > 1)")


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


def run(args: argparse.Namespace) -> None:
    # Imported here so `--help` and argument errors stay instant (megatron imports take seconds).
    if args.command == "hf-to-mcore":
        from qwen3vl.launch.convert_commands import hf_to_mcore

        hf_to_mcore(args.hf, args.out, dtype=args.dtype)
    elif args.command == "mcore-to-hf":
        from qwen3vl.launch.convert_commands import mcore_to_hf

        mcore_to_hf(args.ckpt, args.out, dtype=args.dtype, expert_layout=args.expert_layout,
                    max_shard_bytes=args.max_shard_size)
    else:
        from qwen3vl.launch.convert_verify import verify_command

        verify_command(args)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from qwen3vl.launch.convert_commands import user_errors

    try:
        run(args)
    except user_errors() as error:
        print(f"qwen3vl-convert {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # dist checkpointing's save spawns a Manager that re-imports __main__
    main()

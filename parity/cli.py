"""The `twinlm` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twinlm",
        description="Mirrored PyTorch / Flax NNX LLaMA-family models: convert checkpoints, "
        "measure how far the two twins agree, and record references for CI.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_convert(sub)
    return parser


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from weights.checkpoint import parse_size
    from weights.convert import DTYPE_NAMES

    def size(text: str) -> int:
        try:
            return parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p = sub.add_parser(
        "convert", help="re-type, re-shard or re-layout a checkpoint, tensor by tensor",
        description="Convert the checkpoint directory SRC into a new directory DST, streaming one "
        "tensor at a time. DST appears only when complete; on error it is left as it was.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory (HF layout, or twinlm's Flax layout)")
    p.add_argument("dst", metavar="DST", help="directory to create")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), help="re-type floating tensors (default: keep)")
    p.add_argument("--max-shard-size", type=size, default="5GB", help="HF layout shard limit (default 5GB)")
    p.add_argument("--layout", choices=["hf", "flax"], default="hf",
                   help="hf: HF names and shards; flax: one file of NNX paths with [in, out] kernels")
    p.add_argument("--force", action="store_true", help="replace an existing DST")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read .bin/.pt weights with torch.load(weights_only=True)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from weights.convert import convert
    from weights.errors import LOAD_ERRORS

    try:
        result = convert(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                         layout=args.layout, force=args.force, allow_pickle=args.allow_pickle,
                         progress=False if args.no_progress else None)
    except LOAD_ERRORS as e:
        # One line naming file and tensor: a bad input is the user's to fix, not a crash.
        print(f"twinlm convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"twinlm convert: interrupted; {args.dst} left as it was", file=sys.stderr)
        return 130
    print(f"wrote {result.dst} ({result.layout} layout, {result.tensors} tensors, "
          f"{result.nbytes / 1e9:.2f} GB in {len(result.files)} file(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

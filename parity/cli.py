"""The `twinlm` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parity.report import Report

from weights.dtypes import FLOAT_DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twinlm",
        description="Mirrored PyTorch / Flax NNX LLaMA-family models: convert checkpoints, "
        "measure how far the two twins agree, and record references for CI.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_convert(sub)
    _add_check(sub)
    _add_demo(sub)
    _add_record(sub)
    _add_compare(sub)
    _add_explain(sub)
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


# ---- parity: check, demo, record, compare -------------------------------------------------
_DTYPES = list(FLOAT_DTYPES)
_SKIPPABLE = {"gradients": "gradients", "kv-cache": "kv cache", "generation": "generation"}
_EXIT_DOC = "Exit status: 0 when every tensor is within tolerance, 1 on a parity failure, 2 on bad input."


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _inputs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="compute dtype of both twins (default float32)")
    p.add_argument("--seq-len", type=_positive, default=16, help="tokens per row (default 16)")
    p.add_argument("--batch", type=_positive, default=3,
                   help="rows, padded left, right, none, left, ... (default 3; at least 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the input tokens and labels (default 0)")


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check", help="load a checkpoint into both twins and measure every difference",
        description="Load the HF checkpoint DIR (any head) into the torch and the Flax twin and compare, "
        "on seeded inputs with a left- and a right-padded row: every hidden state and attention map, "
        "the head's outputs and loss, every parameter's gradient, KV-cache decoding and greedy "
        "generation. " + _EXIT_DOC)
    p.add_argument("dir", metavar="DIR", nargs="?", help="checkpoint directory (config.json + safetensors)")
    _inputs_args(p)
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report with a per-layer plot")
    p.add_argument("--explain", metavar="DIR", help="with --html: also write the `twinlm explain` site, with "
                   "this check's figures, to DIR and link each row of the report to its component's page")
    p.add_argument("--skip", action="append", default=[], choices=list(_SKIPPABLE),
                   help="leave out a part of the check (repeatable)")
    p.add_argument("--tolerances", action="store_true", help="print the tolerance table and exit")
    _stream_args(p)
    p.set_defaults(func=_run_check)


def _stream_args(p: argparse.ArgumentParser) -> None:
    from weights.checkpoint import parse_size

    def size(text: str) -> int:
        try:
            return parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="check layer by layer from the memory-mapped checkpoint (--stream) or with both whole "
                   "models loaded (--no-stream); default: stream when the whole-model check's estimated peak "
                   "exceeds --memory-budget")
    p.add_argument("--memory-budget", type=size, metavar="SIZE",
                   help="memory the check may use, e.g. 8GB (default: 70%% of the memory available now)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars (stderr)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="build small checkpoints for every head, convert them, check both twins",
        description="Build seeded checkpoints (HF layout) with the torch twin, convert them to the Flax "
        "layout, load each into its twin and run `check` in each dtype; write the HTML report and the "
        "`twinlm explain` site with the figures. No network needed.")
    p.add_argument("--out", default="reports/demo", help="where checkpoints and reports go (default reports/demo)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated dtypes for every model (default: float64 for each, and float32 "
                   "and bfloat16 for the LLaMA causal LM)")
    p.add_argument("--explain", metavar="DIR", help="where the `twinlm explain` site with the demo's figures "
                   "goes (default: OUT/explain)")
    p.set_defaults(func=_run_demo)


def _add_record(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "record", help="write reference outputs of one twin for CI regression checks",
        description="Run one twin on the seeded inputs and write inputs, head outputs, hidden states and "
        "loss to OUT (safetensors), with the framework versions in its metadata.")
    p.add_argument("dir", metavar="DIR", help="checkpoint directory")
    p.add_argument("out", metavar="OUT", help="reference file to write (.safetensors)")
    p.add_argument("--framework", choices=["torch", "flax"], default="torch", help="twin to run (default torch)")
    _inputs_args(p)
    p.set_defaults(func=_run_record)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="rerun a recorded reference and report any regression",
        description="Rerun the inputs stored in REF on DIR and compare every recorded output, against the "
        "tolerance table or --rtol/--atol (elementwise, as numpy.allclose). " + _EXIT_DOC)
    p.add_argument("dir", metavar="DIR", help="checkpoint directory")
    p.add_argument("ref", metavar="REF", help="reference file written by `twinlm record`")
    p.add_argument("--framework", choices=["torch", "flax"], help="twin to run (default: the recorded one)")
    p.add_argument("--rtol", type=float, help="relative tolerance (elementwise)")
    p.add_argument("--atol", type=float, help="absolute tolerance (elementwise)")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    p.set_defaults(func=_run_compare)


def _setup_jax() -> None:
    # float64 parity needs JAX's 64-bit mode, and it must be set before any array exists.
    import jax

    jax.config.update("jax_enable_x64", True)


def _bad_input(command: str, e: BaseException) -> int:
    print(f"twinlm {command}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def _input_errors() -> tuple[type[BaseException], ...]:
    from parity.loading import BadInputError
    from weights.errors import LOAD_ERRORS

    return (BadInputError,) + LOAD_ERRORS


def _run_check(args: argparse.Namespace) -> int:
    if args.tolerances:
        from parity.tolerances import format_table

        print(format_table())
        return 0
    if args.dir is None:
        return _bad_input("check", ValueError("missing DIR (or pass --tolerances)"))
    _setup_jax()
    from parity.check import check_checkpoint
    from parity.report import SECTIONS

    sections = [s for s in SECTIONS if s not in {_SKIPPABLE[k] for k in args.skip}]
    try:
        report = check_checkpoint(args.dir, args.dtype, seq_len=args.seq_len, batch_size=args.batch,
                                  seed=args.seed, sections=sections, stream=args.stream,
                                  memory_budget=args.memory_budget, progress=False if args.no_progress else None,
                                  announce=lambda mode: print(f"twinlm check: {mode}", file=sys.stderr, flush=True))
    except _input_errors() as e:
        return _bad_input("check", e)
    print(report.format_table())
    if args.json:
        print(f"figures: {report.write_json(args.json)}")
    if args.html:
        _write_html_report(report, args.html, args.explain)
    return 0 if report.passed else 1


def _write_html_report(report: Report, html: str, explain: str | None = None) -> None:
    """The HTML report; with `explain`, the explain site too, the report's rows linked to it."""
    from parity.explain.report_html import write_html

    if explain:
        from parity.explain.site import write_site

        print(f"explain: {write_site(explain, [report]).resolve()}")
    print(f"report: {write_html([report], html, explain=explain)}")


def _run_demo(args: argparse.Namespace) -> int:
    _setup_jax()
    from parity.demo import run_demo

    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else None
    bad = [d for d in dtypes or () if d not in _DTYPES]
    if bad:
        return _bad_input("demo", ValueError(f"unknown dtype(s) {', '.join(bad)}; choose from {', '.join(_DTYPES)}"))
    reports, _ = run_demo(args.out, dtypes, explain=args.explain)
    return 0 if all(r.passed for r in reports) else 1


def _run_record(args: argparse.Namespace) -> int:
    _setup_jax()
    from parity.record import record

    try:
        path = record(args.dir, args.out, framework=args.framework, dtype=args.dtype, seq_len=args.seq_len,
                      batch_size=args.batch, seed=args.seed)
    except _input_errors() as e:
        return _bad_input("record", e)
    print(f"wrote {path} ({args.framework} twin, {args.dtype}, batch {args.batch} x {args.seq_len})")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    _setup_jax()
    from parity.record import compare_reference

    try:
        report = compare_reference(args.dir, args.ref, framework=args.framework, rtol=args.rtol, atol=args.atol)
    except _input_errors() as e:
        return _bad_input("compare", e)
    print(report.format_table())
    if args.json:
        print(f"figures: {report.write_json(args.json)}")
    if args.html:
        _write_html_report(report, args.html)
    return 0 if report.passed else 1


# ---- explain ----------------------------------------------------------------------------------
def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain", help="write the two twins side by side, statement by statement, as a static site",
        description="Write a static site (HTML, CSS, inline SVG; no script, no network) to OUT: one page per "
        "component in the order data flows, with the torch and Flax source aligned statement by statement, "
        "the shapes, the parameter table, and with --report the measured error of each component.")
    p.add_argument("--out", default="reports/explain", help="directory to write (default reports/explain)")
    p.add_argument("--report", metavar="JSON", help="figures to show: `twinlm check --json` output or the "
                   "parity.json `twinlm demo` writes")
    p.set_defaults(func=_run_explain)


def _run_explain(args: argparse.Namespace) -> int:
    from parity.explain.measured import load_reports
    from parity.explain.site import write_site

    reports = None
    if args.report:
        try:
            reports = load_reports(args.report)
        except (OSError, ValueError, KeyError, TypeError) as e:
            return _bad_input("explain", e)
    print(f"explain: {write_site(args.out, reports).resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The `twinlm` command line: one entry point, one subcommand per job.

Exit status, for every subcommand (a contract tested in tests/parity/test_cli_contract.py):
  0  success: every tensor within tolerance, or the file written
  1  a parity failure or a regression (`check`, `compare`, `demo`), and nothing else
  2  anything else: bad arguments, bad input, an output path that cannot be written, a source
     that changed while read, too little memory or disk, an internal error; always one line on
     stderr, `twinlm <command>: error: ...`, never a traceback (TWINLM_TRACEBACK=1 shows one)
  130 interrupted (Ctrl-C), 143 terminated (SIGTERM); outputs are left as they were, staging removed
Inputs and output paths are checked before any work, so a typo costs nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from weights.dtypes import FLOAT_DTYPES

if TYPE_CHECKING:
    from parity.report import Report

_EXIT = """exit status:
  0  {ok}
  1  {fail}
  2  bad arguments or input, an unwritable output, or an internal error (one line on stderr)"""
_PARITY_EXIT = _EXIT.format(ok="every tensor within tolerance",
                            fail="a parity failure (some tensor out of tolerance, or non-finite)")
_WRITE_EXIT = _EXIT.format(ok="written", fail="never (no comparison is made)")


class UsageError(Exception):
    """A bad command line, found by twinlm rather than argparse (same one-line form, exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `twinlm check: error: ... (see twinlm check --help)`."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"twinlm {v('twinlm')} (torch {v('torch')}, jax {v('jax')}, flax {v('flax')}, numpy {v('numpy')})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="twinlm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mirrored PyTorch / Flax NNX LLaMA-family models: convert checkpoints, "
        "measure how far the two twins agree, and record references for CI.",
        epilog="examples:\n  twinlm demo\n  twinlm check path/to/llama --dtype float32 --json parity.json\n"
               "  twinlm convert path/to/llama llama-flax --layout flax\n\n"
               "exit status: 0 success, 1 parity failure or regression, 2 bad input or any other error\n"
               "(one line on stderr); `twinlm COMMAND --help` for each command's.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    _add_convert(sub)
    _add_check(sub)
    _add_demo(sub)
    _add_record(sub)
    _add_compare(sub)
    _add_explain(sub)
    _add_generate(sub)
    return parser


def _subparser(sub: argparse._SubParsersAction, name: str, help: str, description: str,
               examples: list[str], exit_doc: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="examples:\n" + "\n".join(f"  {e}" for e in examples) + "\n\n" + exit_doc)


# ---- argument types --------------------------------------------------------------------------
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {value}")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a non-negative finite number, got {text}")
    return value


# ---- convert ---------------------------------------------------------------------------------
def _add_convert(sub: argparse._SubParsersAction) -> None:
    from weights.checkpoint import parse_size
    from weights.convert import DTYPE_NAMES

    def size(text: str) -> int:
        try:
            return parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p = _subparser(
        sub, "convert", "re-type, re-shard or re-layout a checkpoint, tensor by tensor",
        "Convert the checkpoint directory SRC into a new directory DST, streaming one tensor at a time. "
        "SRC is validated as loading validates it (every tensor named, shaped and typed as config.json "
        "implies) and contained (no file linked from outside SRC is read). DST appears only when complete; "
        "on error it is left as it was.",
        ["twinlm convert path/to/llama llama-bf16 --dtype bfloat16 --max-shard-size 2GB",
         "twinlm convert path/to/llama llama-flax --layout flax",
         "twinlm convert ~/.cache/huggingface/hub/models--x/snapshots/abc x-copy --follow-symlinks"],
        _WRITE_EXIT)
    p.add_argument("src", metavar="SRC", help="checkpoint directory (HF layout, or twinlm's Flax layout)")
    p.add_argument("dst", metavar="DST", help="directory to create (not inside SRC, not a symlink)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), help="re-type floating tensors (default: keep)")
    p.add_argument("--max-shard-size", type=size, default="5GB", help="HF layout shard limit (default 5GB)")
    p.add_argument("--layout", choices=["hf", "flax"], default="hf",
                   help="hf: HF names and shards; flax: one file of NNX paths with [in, out] kernels")
    p.add_argument("--force", action="store_true", help="replace an existing DST (atomically)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read .bin/.pt weights with torch.load(weights_only=True)")
    p.add_argument("--no-strict", action="store_true",
                   help="pass through tensors the model has no parameter for (default: refuse them)")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="read files of SRC that link outside it (e.g. a Hugging Face cache snapshot)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from weights.convert import convert

    result = convert(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     layout=args.layout, force=args.force, allow_pickle=args.allow_pickle,
                     progress=False if args.no_progress else None, strict=not args.no_strict,
                     follow_symlinks=args.follow_symlinks)
    for path in result.cleaned:
        _err(f"twinlm convert: removed {path}, the staging directory of an earlier run that died")
    for what in result.skipped:
        _err(f"twinlm convert: not copied: {what}")
    if result.passed_through:
        _err(f"twinlm convert: passed through {len(result.passed_through)} tensor(s) the model has no "
             f"parameter for (--no-strict): {', '.join(result.passed_through[:5])}")
    _out(f"wrote {result.dst} ({result.layout} layout, {result.head}, {result.tensors} tensors, "
         f"{result.nbytes / 1e9:.2f} GB in {len(result.files)} file(s))")
    return 0


# ---- parity: check, demo, record, compare -------------------------------------------------
_DTYPES = list(FLOAT_DTYPES)
_SKIPPABLE = {"gradients": "gradients", "kv-cache": "kv cache", "generation": "generation"}


def _inputs_args(p: argparse.ArgumentParser, dtype_help: str) -> None:
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help=dtype_help)
    p.add_argument("--seq-len", type=_positive, default=16,
                   help="tokens per row (default 16; at most the model's max_position_embeddings)")
    p.add_argument("--batch", type=_positive, default=3,
                   help="rows, padded left, right, none, left, ... (default 3; at least 2)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the input tokens and labels (default 0)")


def _nonfinite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-nonfinite-weights", action="store_true",
                   help="load a checkpoint holding NaN or infinite weights (default: refuse it, naming them)")


def _run_args(p: argparse.ArgumentParser) -> None:
    """How and where the twins run (check, record, compare)."""
    p.add_argument("--param-dtype", choices=_DTYPES, default=None,
                   help="dtype the parameters are stored in (default: --dtype); e.g. --dtype bfloat16 "
                   "--param-dtype float32 for mixed precision, weights cast at use")
    p.add_argument("--device", default=None, metavar="cpu|cuda[:N]", help="device of the torch twin (default cpu)")
    p.add_argument("--jax-platform", choices=["cpu", "gpu", "tpu"], default=None,
                   help="platform of the Flax twin (default: JAX's default backend)")
    p.add_argument("--matmul-precision", choices=["highest", "tf32", "bf16x3"], default=None,
                   help="float32 matmuls of both twins: highest (full float32; the default), tf32 (GPUs), "
                   "bf16x3 (XLA's 3-pass bfloat16; torch stays float32); set for the run, restored after")


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub, "check", "load a checkpoint into both twins and measure every difference",
        "Load the HF checkpoint DIR (any head) into the torch and the Flax twin and compare, on seeded "
        "inputs with a left- and a right-padded row: every hidden state and attention map, the head's "
        "outputs and loss, every parameter's gradient, KV-cache decoding and greedy generation. NaN or "
        "infinity in an output fails its row.",
        ["twinlm check path/to/llama",
         "twinlm check path/to/llama --dtype bfloat16 --json parity.json --html parity.html",
         "twinlm check path/to/llama --skip gradients --skip generation --seq-len 64",
         "twinlm check path/to/llama --mesh data=2,tensor=4",
         "twinlm check path/to/llama --fast --device cuda --jax-platform gpu",
         "twinlm check --tolerances"],
        _PARITY_EXIT)
    p.add_argument("dir", metavar="DIR", nargs="?", help="checkpoint directory (config.json + safetensors)")
    _inputs_args(p, "compute dtype of both twins (default float32)")
    _run_args(p)
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report with a per-layer plot")
    p.add_argument("--explain", metavar="DIR", help="with --html: also write the `twinlm explain` site, with "
                   "this check's figures, to DIR and link each row of the report to its component's page")
    p.add_argument("--skip", action="append", default=[], choices=list(_SKIPPABLE),
                   help="leave out a part of the check (repeatable; the report says what was left out)")
    _nonfinite_arg(p)
    p.add_argument("--tolerances", action="store_true", help="print the tolerance table and exit")
    p.add_argument("--fast", action="store_true",
                   help="run both twins on their fused attention kernels (torch SDPA, jax.nn.dot_product_attention) "
                   "instead of the eager reference, and compare those; the kernels return no attention maps, "
                   "so those rows are left out (the report says so). Soft-capped scores, float64 and float16 "
                   "stay eager")
    p.add_argument("--mesh", metavar="AXES", help="run the Flax twin sharded over a device mesh, e.g. "
                   "data=2,tensor=4 (axes data, fsdp, tensor; CPU devices are simulated), and also compare it "
                   "with itself unsharded; under torchrun (as many processes as the mesh has places) the "
                   "torch twin too, sharded over the ranks (gloo), against itself unsharded")
    _stream_args(p)
    _training_args(p)
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


def _training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-steps", type=_positive, metavar="K",
                   help="instead of the inference check: K AdamW steps in both twins from the checkpoint, on "
                   "seeded batches (one per step); per step loss, grad norm and every parameter. Mixed "
                   "precision: --dtype bfloat16 --param-dtype float32 (float32 master weights and moments)")
    p.add_argument("--accumulation-steps", type=_positive, default=1, metavar="A",
                   help="with --train-steps: cut each batch into A micro-batches (default 1)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub, "demo", "build small checkpoints for every head, convert them, check both twins",
        "Build seeded checkpoints (HF layout) with the torch twin, convert them to the Flax layout, load "
        "each into its twin and run `check` in each dtype; write the HTML report and the `twinlm explain` "
        "site with the figures. No network needed.",
        ["twinlm demo", "twinlm demo --out /tmp/demo --dtypes float32,bfloat16"],
        _EXIT.format(ok="every check passed", fail="some check failed"))
    p.add_argument("--out", default="reports/demo", help="where checkpoints and reports go (default reports/demo)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated dtypes for every model (default: float64 for each, and float32 "
                   "and bfloat16 for the LLaMA causal LM)")
    p.add_argument("--explain", metavar="DIR", help="where the `twinlm explain` site with the demo's figures "
                   "goes (default: OUT/explain)")
    p.set_defaults(func=_run_demo)


def _add_record(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub, "record", "write reference outputs of one twin for CI regression checks",
        "Run one twin on the seeded inputs and write inputs, head outputs, hidden states and loss to OUT "
        "(safetensors), with the framework versions and a fingerprint of DIR in its metadata. `twinlm "
        "compare` reruns it later.",
        ["twinlm record path/to/llama ref.safetensors",
         "twinlm record path/to/llama ref.safetensors --framework flax --dtype float64 --force"],
        _WRITE_EXIT)
    p.add_argument("dir", metavar="DIR", help="checkpoint directory")
    p.add_argument("out", metavar="OUT", help="reference file to write (.safetensors)")
    p.add_argument("--framework", choices=["torch", "flax"], default="torch", help="twin to run (default torch)")
    _inputs_args(p, "compute dtype of the twin that runs (default float32)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    _nonfinite_arg(p)
    _run_args(p)
    p.set_defaults(func=_run_record)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub, "compare", "rerun a recorded reference and report any regression",
        "Rerun the inputs stored in REF on DIR and compare every recorded output (named as `check` names "
        "them), against the tolerance table or --rtol/--atol (elementwise, as numpy.allclose). A reference "
        "recorded from a different checkpoint is compared with a warning.",
        ["twinlm compare path/to/llama ref.safetensors",
         "twinlm compare path/to/llama ref.safetensors --framework flax --rtol 1e-5 --atol 1e-6 --json c.json"],
        _EXIT.format(ok="every recorded output reproduced within tolerance",
                     fail="a regression (some output out of tolerance, or non-finite)"))
    p.add_argument("dir", metavar="DIR", help="checkpoint directory")
    p.add_argument("ref", metavar="REF", help="reference file written by `twinlm record`")
    p.add_argument("--framework", choices=["torch", "flax"], help="twin to run (default: the recorded one)")
    p.add_argument("--rtol", type=_tolerance, help="relative tolerance (elementwise)")
    p.add_argument("--atol", type=_tolerance, help="absolute tolerance (elementwise)")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    _nonfinite_arg(p)
    _run_args(p)
    p.set_defaults(func=_run_compare)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub, "generate", "continue a prompt with either twin, streaming the text as it comes",
        "Load the causal LM in DIR into one twin and continue --prompt (encoded with the directory's "
        "tokenizer.json or tokenizer.model) through the serving runner, printing each piece of text as its "
        "token comes. Greedy unless --sample. Stops at the config's eos token unless --ignore-eos.",
        ["twinlm generate reports/demo/checkpoints/llama-causal-lm --prompt 'The model'",
         "twinlm generate path/to/llama --prompt 'The model' --framework flax --sample --temperature 0.8 "
         "--top-p 0.9 --seed 7",
         "twinlm generate path/to/llama --prompt-ids 1,415,2229 --max-new-tokens 8"],
        _EXIT.format(ok="the continuation written", fail="never (no comparison is made)"))
    p.add_argument("dir", metavar="DIR", help="checkpoint directory (config.json, safetensors, a tokenizer)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt-ids", help="the prompt as comma-separated token ids (no tokenizer needed; "
                        "token ids are printed)")
    p.add_argument("--framework", choices=["torch", "flax"], default="torch", help="twin to run (default torch)")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="compute dtype (default float32)")
    p.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens to add at most (default 32)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top-k", type=_positive, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="keep the most likely tokens up to mass p")
    p.add_argument("--filter-order", choices=["generate", "grok"], default="generate",
                   help="generate: temperature, top-k, top-p, mask (default); grok: temperature, mask, top-k, top-p")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the sampling noise (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the config's eos token")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    _setup_jax()
    from parity.text.generate import generate_text

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        ids = None if args.prompt_ids is None else [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}") from None
    try:
        generate_text(args.dir, args.prompt, prompt_ids=ids, framework=args.framework, dtype=args.dtype,
                      max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, filter_order=args.filter_order,
                      stop_at_eos=not args.ignore_eos, write=write)
    except ValueError as e:  # a setting the Request refuses (temperature, top-p, a token id out of range)
        raise UsageError(_one_line(e)) from None
    write("\n")
    return 0


def _setup_jax() -> None:
    # float64 parity needs JAX's 64-bit mode, and it must be set before any array exists.
    import jax

    jax.config.update("jax_enable_x64", True)


def _outputs(args: argparse.Namespace, *flags: str) -> None:
    """Check every output file flag before any work (a typo must cost nothing)."""
    from parity.paths import check_output_file

    given = [(f, getattr(args, f.lstrip("-").replace("-", "_"))) for f in flags]
    given = [(f, v) for f, v in given if v is not None]
    for f, v in given:
        check_output_file(v, f, outside=getattr(args, "dir", None))
    paths = [os.path.realpath(v) for _, v in given]
    if len(set(paths)) < len(paths):
        raise UsageError(f"{' and '.join(f for f, _ in given)} name the same file")


def _before_models(args: argparse.Namespace, *, twins: int, new_tokens: int = 0, whole_models: bool = True) -> None:
    """Everything about DIR and the run size that can be refused without a model, done before
    torch and JAX are even imported: a bad input costs a fraction of a second, not the imports."""
    from parity.inputs import check_run_size
    from parity.loading import inspect_checkpoint

    config, _ = inspect_checkpoint(args.dir, args.dtype, twins=twins if whole_models else 0,
                                   allow_nonfinite=args.allow_nonfinite_weights)
    try:
        check_run_size(config, args.batch, args.seq_len, args.dtype, twins=twins, new_tokens=new_tokens)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _run_kwargs(args: argparse.Namespace, precision_default: str | None = "highest") -> dict:
    """The `_run_args` flags as keyword arguments (compare: precision defaults to the recorded one)."""
    return dict(param_dtype=args.param_dtype, device=args.device, jax_platform=args.jax_platform,
                matmul_precision=args.matmul_precision or precision_default)


def _run_check(args: argparse.Namespace) -> int:
    if args.tolerances:
        from parity.tolerances import format_table

        _out(format_table())
        return 0
    if args.dir is None:
        raise UsageError("missing DIR (or pass --tolerances)")
    _outputs(args, "--json", "--html")
    if args.explain is not None:
        from parity.paths import check_output_dir

        if not args.html:
            raise UsageError("--explain needs --html (the report it links from)")
        check_output_dir(args.explain, "--explain")
    mesh = _mesh_arg(args.mesh)
    skipped = {_SKIPPABLE[k] for k in args.skip}
    # Two whole twins' weights are weighed by the mode choice (streamed holds one layer), except
    # with --no-stream; the activations are those of two twins either way.
    _before_models(args, twins=2, new_tokens=0 if "generation" in skipped else 8,
                   whole_models=args.stream is False)
    _setup_jax()
    if args.train_steps:
        if args.fast:
            raise UsageError("--fast checks inference; --train-steps runs the eager attention (dropout needs it)")
        return _run_training_check(args)
    from parity.check import check_checkpoint
    from parity.report import SECTIONS

    sections = [s for s in SECTIONS if s not in skipped]
    report = check_checkpoint(args.dir, args.dtype, seq_len=args.seq_len, batch_size=args.batch,
                              seed=args.seed, sections=sections, stream=args.stream,
                              memory_budget=args.memory_budget, progress=False if args.no_progress else None,
                              announce=lambda mode: _err(f"twinlm check: {mode}"),
                              allow_nonfinite_weights=True,  # scanned by _before_models, as asked
                              mesh=mesh, attn_implementation="fast" if args.fast else "eager",
                              **_run_kwargs(args))
    for s in skipped:
        report.skipped[s] = f"--skip {next(k for k, v in _SKIPPABLE.items() if v == s)}"
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports for all
        return 0 if report.passed else 1
    _out(report.format_table())
    if args.json:
        _out(f"figures: {report.write_json(args.json)}")
    if args.html:
        _write_html_report(report, args.html, args.explain)
    return 0 if report.passed else 1


def _mesh_arg(text: str | None) -> dict[str, int] | None:
    """`--mesh`, parsed; on CPU, XLA is asked for that many devices (read once, when JAX starts)."""
    if text is None:
        return None
    from weights.partition import parse_mesh

    try:
        mesh = parse_mesh(text)
    except ValueError as e:
        raise UsageError(str(e)) from None
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        count = 1
        for size in mesh.values():
            count *= size
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return mesh


def _write_html_report(report: Report, html: str, explain: str | None = None) -> None:
    """The HTML report; with `explain`, the explain site too, the report's rows linked to it."""
    from parity.explain.report_html import write_html

    if explain:
        from parity.explain.site import write_site

        _out(f"explain: {write_site(explain, [report]).resolve()}")
    _out(f"report: {write_html([report], html, explain=explain)}")


def _run_training_check(args: argparse.Namespace) -> int:
    from parity.check.training import check_training

    report = check_training(args.dir, args.dtype, steps=args.train_steps, seq_len=args.seq_len,
                            batch_size=args.batch, seed=args.seed, accumulation_steps=args.accumulation_steps,
                            param_dtype=args.param_dtype)
    _out(report.format_table())
    if args.json:
        _out(f"figures: {report.write_json(args.json)}")
    if args.html:
        _write_html_report(report, args.html, args.explain)
    return 0 if report.passed else 1


def _run_demo(args: argparse.Namespace) -> int:
    from parity.paths import check_output_dir

    dtypes = None
    if args.dtypes is not None:
        dtypes = tuple(d.strip() for d in args.dtypes.split(","))
        bad = [d or '""' for d in dtypes if d not in _DTYPES]
        if bad:
            raise UsageError(f"--dtypes: unknown dtype(s) {', '.join(bad)}; choose from {', '.join(_DTYPES)}")
    check_output_dir(args.out, "--out")
    if args.explain is not None:
        check_output_dir(args.explain, "--explain")
    _setup_jax()
    from parity.demo import run_demo

    reports, _ = run_demo(args.out, dtypes, echo=_out, explain=args.explain)
    return 0 if all(r.passed for r in reports) else 1


def _run_record(args: argparse.Namespace) -> int:
    from parity.paths import check_output_file

    check_output_file(args.out, "OUT", overwrite=args.force, outside=args.dir)
    _before_models(args, twins=1)
    _setup_jax()
    from parity.record import record

    path = record(args.dir, args.out, framework=args.framework, dtype=args.dtype, seq_len=args.seq_len,
                  batch_size=args.batch, seed=args.seed, force=args.force,
                  allow_nonfinite_weights=True,  # scanned by _before_models, as asked
                  **_run_kwargs(args))
    _out(f"wrote {path} ({args.framework} twin, {args.dtype}, batch {args.batch} x {args.seq_len})")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    _outputs(args, "--json", "--html")
    from parity.record import validate_reference

    validate_reference(args.dir, args.ref, args.framework)  # before torch and JAX are imported
    _setup_jax()
    from parity.record import compare_reference

    report = compare_reference(args.dir, args.ref, framework=args.framework, rtol=args.rtol, atol=args.atol,
                               allow_nonfinite_weights=args.allow_nonfinite_weights,
                               **_run_kwargs(args, precision_default=None))
    for warning in report.meta.get("warnings", []):
        _err(f"twinlm compare: warning: {warning}")
    _out(report.format_table())
    if args.json:
        _out(f"figures: {report.write_json(args.json)}")
    if args.html:
        _write_html_report(report, args.html)
    return 0 if report.passed else 1


# ---- explain ----------------------------------------------------------------------------------
def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub, "explain", "write the two twins side by side, statement by statement, as a static site",
        "Write a static site (HTML, CSS, inline SVG; no script, no network) to OUT: one page per component in "
        "the order data flows, with the torch and Flax source aligned statement by statement, the shapes, the "
        "parameter table, and with --report the measured error of each component.",
        ["twinlm explain", "twinlm explain --out site --report parity.json"],
        _EXIT.format(ok="the site written", fail="never (no comparison is made)"))
    p.add_argument("--out", default="reports/explain", help="directory to write (default reports/explain)")
    p.add_argument("--report", metavar="JSON", help="figures to show: `twinlm check --json` output or the "
                   "parity.json `twinlm demo` writes")
    p.set_defaults(func=_run_explain)


def _run_explain(args: argparse.Namespace) -> int:
    from parity.explain.measured import load_reports
    from parity.explain.site import write_site
    from parity.paths import check_output_dir

    check_output_dir(args.out, "--out")
    reports = None
    if args.report:
        try:
            reports = load_reports(args.report)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise UsageError(f"--report {args.report}: {_one_line(e)}") from None
    _out(f"explain: {write_site(args.out, reports).resolve()}")
    return 0


# ---- one error path ---------------------------------------------------------------------------
_stdout_closed = False


def _out(text: str) -> None:
    """Print to stdout; a reader that went away (`twinlm ... | head`) ends the output, not the run."""
    global _stdout_closed
    if _stdout_closed:
        return
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _stdout_closed = True
        # Further writes, and the interpreter's final flush, go nowhere instead of raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _err(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):
        pass


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input or environment can cause: reported in one line, exit 2."""
    from parity.loading import BadInputError
    from weights.errors import LOAD_ERRORS

    return (UsageError, BadInputError, OSError, MemoryError) + LOAD_ERRORS


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text if len(text) <= 2000 else text[:1997] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run `twinlm`; returns the exit status (see the module doc): 0, 1 (parity failure only),
    2 (any other failure, one line on stderr), 130 (Ctrl-C) or 143 (SIGTERM)."""
    global _stdout_closed
    _stdout_closed = False
    # torch's OpenMP workers spin while waiting by default; on a machine whose cores are shared
    # (with JAX's threads in this same process, or with other jobs) that spinning steals the
    # cores the work needs: measured 2.3-2.5x slower float32 generation on a busy 2-core machine.
    # Set before torch is imported; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: one line, exit 2 (`_Parser.error`)
    command = f"twinlm {args.command}"
    func: Callable[[argparse.Namespace], Any] = args.func
    previous = _on_sigterm()
    try:
        return int(func(args) or 0)
    except _Terminated:
        _err(f"{command}: terminated; every output left as it was")
        return 143
    except KeyboardInterrupt:
        _err(f"{command}: interrupted; every output left as it was")
        return 130
    except BrokenPipeError:  # stderr gone too: nothing left to say
        return 2
    except Exception as e:  # noqa: BLE001 - the CLI's one error path: no traceback, never exit 1
        if os.environ.get("TWINLM_TRACEBACK"):
            import traceback

            traceback.print_exc()
        if isinstance(e, _user_errors()):
            _err(f"{command}: error: {_one_line(e)}")
        else:
            _err(f"{command}: internal error: {type(e).__name__}: {_one_line(e)} "
                 "(a bug in twinlm; TWINLM_TRACEBACK=1 shows the traceback)")
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every `finally` (staging directories,
    temporary files) runs before the exit, as for Ctrl-C."""


def _on_sigterm() -> Any:
    """Turn SIGTERM into `_Terminated` for the duration of a command; returns the handler it
    replaced (None off the main thread, where Python cannot install one)."""
    def handler(signum: int, frame: Any) -> None:
        raise _Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())

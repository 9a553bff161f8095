"""`twinlm demo`: the whole round trip on small embedded checkpoints, no network.

For each entry of `DEMO_MODELS`: build the torch twin from a seeded init, save it as a
Hugging Face checkpoint, convert that to twinlm's Flax layout with the converter, load the two
directories into the two twins, and run the parity check in each of its dtypes. Tables go to
stdout; one HTML page and one JSON file with every figure go to the output directory.

A new family or head is one more line in `DEMO_MODELS`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from weights.config import ModelConfig, RopeScaling

from .text.demo_tokenizer import save_demo_tokenizer
from .explain.report_html import write_html
from .inputs import HEADS
from .report import Report
from .strategies import family_examples

__all__ = ["DEMO_DTYPES", "DEMO_MODELS", "DemoModel", "build_checkpoint", "run_demo", "tiny_config"]

# A model's dtypes when it names none: float64 is the semantic check, float32 what models run in.
DEMO_DTYPES = ("float64", "float32")


def tiny_config(**fields) -> ModelConfig:
    """A small LLaMA config (2 layers, width 64, GQA 4/2, vocab 256) with `fields` changed."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(fields)
    return ModelConfig(**base)


@dataclass(frozen=True)
class DemoModel:
    """One demo checkpoint: a name (its directory), a head (key of `HEADS`), its config, the
    dtypes it is checked in by default (None: `DEMO_DTYPES`), and how many training steps the
    training check takes on it in float32 (0: none; `twinlm check --train-steps`)."""

    name: str
    head: str
    config: ModelConfig
    dtypes: tuple[str, ...] | None = None
    train_steps: int = 0


_FAMILY = family_examples()  # one tiny config per family, its switches on (parity.strategies)
# Every model runs the semantic check (float64); the first also float32, the dtype models run
# in, and bfloat16, the dtype they are served in (so the explain pages show both measured).
# Each dtype is one more compilation per model and the demo must stay near a minute on 2
# cores; `twinlm demo --dtypes float64,float32,bfloat16,float16` runs every model in each.
_SEMANTIC = ("float64",)

DEMO_MODELS: list[DemoModel] = [
    DemoModel("llama-causal-lm", "causal_lm",
              tiny_config(rope_theta=500000.0, rope_scaling=RopeScaling(
                  "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=64)), DEMO_DTYPES + ("bfloat16",), train_steps=3),
    DemoModel("llama-tied-causal-lm", "causal_lm", tiny_config(tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh"),
              _SEMANTIC),
    DemoModel("llama-sequence-classification", "sequence_classification", tiny_config(num_labels=3), _SEMANTIC),
    DemoModel("llama-question-answering", "question_answering", tiny_config(attention_bias=True, mlp_bias=True),
              _SEMANTIC),
    DemoModel("mistral-causal-lm", "causal_lm", _FAMILY["mistral"], _SEMANTIC),
    DemoModel("qwen2-causal-lm", "causal_lm", _FAMILY["qwen2"], _SEMANTIC),
    DemoModel("gemma-causal-lm", "causal_lm", _FAMILY["gemma"], _SEMANTIC),
    DemoModel("gemma2-causal-lm", "causal_lm", _FAMILY["gemma2"], _SEMANTIC),
    DemoModel("mixtral-causal-lm", "causal_lm", _FAMILY["mixtral"], _SEMANTIC),
]


def build_checkpoint(model: DemoModel, directory: str | os.PathLike, seed: int = 0) -> Path:
    """Save the torch twin of `model`, seeded, as an HF checkpoint in `directory` (float32,
    `save_pretrained`: config.json with `architectures`, model.safetensors).

    Norm gains and biases get seeded noise too (HF's init leaves them at 1 and 0, which would
    let a twin that ignores them pass). A causal LM also gets the demo's tokenizer
    (`parity.text.demo_tokenizer`: a tiny BPE trained on a few paragraphs in the repo), so `twinlm
    generate` takes text."""
    import torch

    import torch_impl

    torch.manual_seed(seed)
    t_model = getattr(torch_impl, HEADS[model.head])(model.config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in t_model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("norm.weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    path = t_model.save_pretrained(directory)
    if model.head == "causal_lm":
        save_demo_tokenizer(path, model.config.vocab_size)
    return path


def run_demo(out_dir: str | os.PathLike = "reports/demo", dtypes: Sequence[str] | None = None,
             models: Sequence[DemoModel] | None = None, *, seq_len: int = 16, batch_size: int = 3,
             echo: Callable[[str], None] = print, explain: str | os.PathLike | None = None
             ) -> tuple[list[Report], Path]:
    """Build, save, convert, load and check every demo model in its dtypes, then write the
    report and the `twinlm explain` site with these figures (`explain`, default `<out_dir>/explain`),
    the report's rows linked to the site's pages.

    `models` defaults to `DEMO_MODELS`; `dtypes`, when given, replaces every model's own.
    Returns the reports and the HTML path (JSON next to it). Checkpoints are rebuilt each run:
    they are seeded, so the figures are the same every time on the same machine.
    """
    from weights.convert import convert

    from .check import check_checkpoint
    from .check.training import check_training
    from .explain.site import write_site

    out = Path(out_dir)
    reports: list[Report] = []
    for model in DEMO_MODELS if models is None else models:
        hf_dir = out / "checkpoints" / model.name
        flax_dir = out / "checkpoints" / (model.name + "-flax")
        start = time.perf_counter()
        build_checkpoint(model, hf_dir)
        convert(hf_dir, flax_dir, layout="flax", force=True, progress=False, fsync=False)
        echo(f"\n## {model.name}: saved by the torch twin to {hf_dir}, converted to the Flax "
             f"layout in {flax_dir}")
        for dtype in dtypes or model.dtypes or DEMO_DTYPES:
            report = check_checkpoint(hf_dir, dtype, seq_len=seq_len, batch_size=batch_size,
                                      flax_directory=flax_dir)
            report.title = f"{model.name} ({dtype})"
            reports.append(report)
            echo("")
            echo(report.format_table())
        if model.train_steps:
            report = check_training(hf_dir, "float32", steps=model.train_steps, seq_len=seq_len,
                                    batch_size=batch_size, flax_directory=flax_dir)
            report.title = f"{model.name} (float32, {model.train_steps} training steps)"
            reports.append(report)
            echo("")
            echo(report.format_table())
        echo(f"({time.perf_counter() - start:.1f} s)")
    explain_dir = Path(explain) if explain is not None else out / "explain"
    site = write_site(explain_dir, reports)
    html_path = write_html(reports, out / "parity.html", title="twinlm demo: parity of the two twins",
                           explain=explain_dir)
    json_path = out / "parity.json"

    json_path.write_text(json.dumps([r.as_dict() for r in reports], indent=1, default=str) + "\n", encoding="utf-8")
    failed = [r.title for r in reports if not r.passed]
    echo("")
    echo(summary_table(reports))
    echo(f"\nreport: {html_path.resolve()}  (every figure: {json_path.resolve()})")
    echo(f"explain: {site.resolve()}  (the two twins side by side, with these figures)")
    echo("all checks PASS" if not failed else f"FAILED: {', '.join(failed)}")
    return reports, html_path


def summary_table(reports: Sequence[Report]) -> str:
    """Worst error relative to tolerance per dtype and quantity, across all reports."""
    lines = ["worst relative error per dtype (tolerance in brackets):"]
    quantities = ("activations", "logits", "loss", "gradients", "parameters")
    dtypes = list(dict.fromkeys(r.dtype for r in reports))
    header = ["dtype"] + list(quantities) + ["tokens"]
    rows = []
    for dt in dtypes:
        cells = [dt]
        for q in quantities:
            worst = [r.worst(quantity=q) for r in reports if r.dtype == dt]
            worst = [w for w in worst if w is not None]
            if not worst:
                cells.append("-")
                continue
            w = max(worst, key=lambda w: w.comparison.rel / max(w.comparison.tolerance, 1e-300))
            cells.append(f"{w.comparison.rel:.1e} [{w.comparison.tolerance:.0e}]")
        tok = [row for r in reports if r.dtype == dt for row in r.rows if row.quantity == "tokens"]
        cells.append("n/a" if not tok or all(t.status == "n/a" for t in tok)
                     else ("identical" if all(t.comparison.max_abs == 0 for t in tok if t.status != "n/a")
                           else "near-tie" if all(t.status != "fail" for t in tok) else "DIFFER"))
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    return "\n".join(lines)


def markdown_summary(reports: Sequence[Report]) -> str:
    """Two Markdown tables for README.md: the worst error per dtype and quantity (with the
    model it occurred in), and per model and dtype the largest share of its tolerance used."""
    quantities = ("activations", "logits", "loss", "gradients", "parameters")
    dtypes = list(dict.fromkeys(r.dtype for r in reports))
    lines = ["| dtype | " + " | ".join(quantities) + " | greedy tokens |", "|---" * (len(quantities) + 2) + "|"]
    for dt in dtypes:
        cells = []
        for q in quantities:
            found = [(r.worst(quantity=q), r) for r in reports if r.dtype == dt]
            found = [(w, r) for w, r in found if w is not None]
            if not found:
                cells.append("-")
                continue
            w, r = max(found, key=lambda x: x[0].comparison.rel / x[0].comparison.tolerance)
            name = r.title.split(" (")[0]
            cells.append(f"{w.comparison.rel:.1e} (tol {w.comparison.tolerance:.0e}; {name}, {w.name})")
        tokens = [row for r in reports if r.dtype == dt for row in r.rows if row.quantity == "tokens"]
        ran = [t for t in tokens if t.status != "n/a"]
        same = sum(t.comparison.max_abs == 0 for t in ran)
        ties = sum(t.comparison.max_abs != 0 and t.status == "pass" for t in ran)
        cells.append("n/a" if not ran else f"{same} of {len(ran)} models identical"
                     + (f", {ties} near-tie" if ties else "") + (f", {len(ran) - same - ties} DIFFER"
                                                                 if len(ran) - same - ties else ""))
        lines.append(f"| {dt} | " + " | ".join(cells) + " |")
    models = list(dict.fromkeys(r.title.split(" (")[0] for r in reports))
    lines += ["", "| model | " + " | ".join(dtypes) + " |", "|---" * (len(dtypes) + 1) + "|"]
    for m in models:
        cells = []
        for dt in dtypes:
            r = next((r for r in reports if r.dtype == dt and r.title.split(" (")[0] == m), None)
            w = r.worst() if r else None
            cells.append("-" if w is None else
                         f"{'PASS' if r.passed else 'FAIL'}, {100 * w.comparison.rel / w.comparison.tolerance:.2g}% of tol")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

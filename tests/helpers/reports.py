"""Small hand-made parity reports (no model runs): what the explain and report-rendering tests
feed the HTML writers."""

from __future__ import annotations

from parity.compare import Comparison
from parity.report import Report, Row

__all__ = ["report_row", "tiny_report"]


def report_row(section: str, name: str, rel: float, tol: float = 1e-5, layer: int | None = None,
               quantity: str = "activations") -> Row:
    """One measured row whose relative and absolute errors are both `rel`."""
    return Row(section, quantity, Comparison(name, rel, rel, (0,), tol, rel <= tol, (2, 3)), layer=layer)


def tiny_report(dtype: str = "float32", broken_layer: int | None = None, title: str = "tiny (float32)") -> Report:
    """A two-layer causal-LM report: embeddings, attention weights and outputs per layer, q_proj
    gradients, logits. From `broken_layer` on, the attention weights and outputs fail."""
    tol = {"float32": 1e-5, "bfloat16": 6e-2}[dtype]
    rows = [report_row("forward", "model.embed_tokens (embeddings)", 0.0, tol)]
    for i in range(2):
        bad = broken_layer is not None and i >= broken_layer
        rows.append(report_row("forward", f"model.layers.{i}.self_attn (attention weights)",
                               3e-3 if bad else 3e-7, tol, layer=i))
        rows.append(report_row("forward", f"model.layers.{i} (output)", 2e-3 if bad else 2e-7, tol, layer=i))
        rows.append(report_row("gradients", f"model.layers.{i}.self_attn.q_proj.weight", 1e-6, 1e-4, i, "gradients"))
    rows.append(report_row("head", "logits", 4e-7, tol, quantity="logits"))
    return Report(title, dtype, "causal_lm", rows, {"describe": {"inputs": "batch 3 x 16 tokens"}, "seed": 0})

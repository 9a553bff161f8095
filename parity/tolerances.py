"""The one tolerance table: how far the twins may differ, per dtype and per quantity.

A comparison passes when `max|torch - flax| <= tol * max(floor, max|reference|)`: relative to
the reference's own scale, and, for a tensor smaller than its dtype's `floor`, relative to the
floor. The floor is where a relative bound stops meaning anything: a gradient that is zero in
exact arithmetic (a bias every logit shares, under softmax) comes out as rounding noise of the
larger terms that cancelled, and no relative bound holds for noise. float64 is the semantic
check (same math, only rounding order differs). Every row was set from measurement (`twinlm demo`
in all four dtypes and the whole hypothesis suite under the CI profile), with headroom, and
each says why it is what it is.

The "parameters" column keeps the floor 1 of the rule it was measured under (`max(1, max|ref|)`,
by the training check, `parity/check/training.py`): it is not re-measured under the dtype floors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Why the "parameters" column (weights after K optimizer steps of `twinlm check --train-steps`)
# is what it is, for every dtype: see `parity/check/training.py` for the elements it excludes.
PARAMETERS_REASON = (
    "parameters after K AdamW steps: each step turns the twins' gradient difference into an update "
    "difference of about |dg| / |g| times the learning rate, so elements whose gradient is within the "
    "gradient tolerance of 0 (no agreed sign: the QA head's bias, barely turning rotary pairs) are "
    "held to 2 x the summed learning rate instead, and named")

QUANTITIES = ("activations", "logits", "loss", "gradients", "parameters")


@dataclass(frozen=True)
class Tolerance:
    """One row of the table: bounds per quantity, the scale floor, and the reason for them."""

    activations: float
    logits: float
    loss: float
    gradients: float
    parameters: float  # after K training steps (`twinlm check --train-steps K`)
    floor: float  # tensors smaller than this are measured as if this large (see the module docstring)
    reason: str

    def for_quantity(self, quantity: str) -> float:
        """The bound for one of `QUANTITIES`."""
        if quantity not in QUANTITIES:
            raise KeyError(f"unknown quantity {quantity!r}; one of {QUANTITIES}")
        return getattr(self, quantity)


class Bound(float):
    """A tolerance (a float) that carries its dtype's scale `floor`, so `parity.compare.compare`
    applies the table's formula to it without being told the dtype."""

    floor: float

    def __new__(cls, value: float, floor: float = 1.0) -> "Bound":
        bound = super().__new__(cls, value)
        bound.floor = float(floor)
        return bound

    def __repr__(self) -> str:
        return f"Bound({float(self)!r}, floor={self.floor!r})"


PARAMETERS_FLOOR = 1.0  # the "parameters" bounds were measured under max(1, max|ref|) (module docstring)

# bfloat16 parameters after K AdamW steps: Adam scales every element's step to about the learning
# rate whatever its gradient's size, so an element whose small gradient bfloat16 rounding turns
# (gradients carry ~1e-2 relative rounding) steps up to 2 x lr the other way: the parameters part by
# a share of 2 x sum(lr) (1e-2 over the check's 10 steps at lr 1e-3), not by ulps.
PARAMETERS_BF16 = 2e-2
PARAMETERS_BF16_REASON = (
    "parameters after K AdamW steps set by Adam, not by ulps: each element steps by about the learning "
    "rate whatever the rounding of its gradient, so elements whose bfloat16 gradient turns part by up "
    "to 2 x lr per step; measured over the check's 10 steps (lr 1e-3, 2 x sum(lr) = 1e-2; 7 families x "
    "3 heads): worst {worst}, 2e-2 for ~2x room (longer runs at a higher rate part further)")

TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-12, 1e-12, 1e-12, 1e-11, 1e-9, 1e-2,
                         "same formulas in the same order; only summation order inside matmul and "
                         "transcendental ulps differ. Measured worst (whole suite under the CI "
                         "profile, numpy and transformers witnesses included, and the demo): "
                         "activations, logits and losses 5.5e-15 relative, gradients 4.0e-15 "
                         "relative and, below the floor, 1.3e-15 absolute (rounding noise of "
                         "gradients that are zero in exact arithmetic); anything above is a real bug; "
                         "parameters after 10 AdamW steps (lr 1e-3; 7 families, 3 heads): worst 1.7e-13 "
                         "(llama3's k_proj bias, as in float32)"),
    "float32": Tolerance(1e-5, 1e-5, 1e-5, 1e-4, 1e-4, 1e-2,
                         "matmul accumulation order differs between XLA and ATen (~1e-7 per op) and "
                         "compounds with depth; measured worst: activations 1.6e-6, logits 1.9e-6, "
                         "loss 1.5e-7 (relative), gradients 1.9e-6 relative and 3.3e-8 absolute "
                         "below the floor; ~6x room for deeper, wider checkpoints, gradients more "
                         "(softmax backward and the loss scale amplify). With the floor, a 3% error "
                         "on a gradient of order 1e-3 fails (bound 1e-6 absolute there); "
                         "parameters after 10 AdamW steps (lr 1e-3; 7 families, 3 heads): worst 3.6e-7, and 8.7e-6 on "
                         "the llama3 example's k_proj bias, whose rotary pairs at llama3's low frequencies "
                         "barely turn (their gradients are 1e-4 of the largest): 10x room; on one H100 "
                         "(both twins on the GPU, matmuls pinned; 9 demo models): activations 1.1e-6, "
                         "logits 1.2e-6, loss 2.1e-7, gradients 2.6e-6"),
    "bfloat16": Tolerance(6e-2, 6e-2, 2e-2, 1e-1, PARAMETERS_BF16, 1.0,
                          "8-bit mantissa (ulp 2^-8 = 4e-3 at 1): a one-ulp rounding split early in "
                          "a layer moves later values by a few ulps; demo worst: activations 3.2e-2, "
                          "logits 3.0e-2, loss 4.5e-4, gradients 3.3e-2 (Gemma at init range 0.2). "
                          "Floor 1: errors here are ulps of the order-one values upstream, not of the "
                          "tensor's own scale (measured: a gradient that is zero in exact arithmetic "
                          "comes out at 8.5e-4); on one H100 (9 demo models): activations 3.9e-2 (qwen2), logits "
                          "2.7e-2, loss 8.4e-4, gradients 2.7e-2; " + PARAMETERS_BF16_REASON.format(worst="6.0e-3 (mistral's QA bias)")),
    "float16": Tolerance(1e-2, 1e-2, 4e-3, 2e-2, math.nan, 1.0,
                         "11-bit mantissa (ulp 2^-11 = 5e-4 at 1): same mechanism as bfloat16 with "
                         "8x finer rounding; demo worst: activations 3.4e-3, logits 4.6e-3, loss "
                         "3.4e-5, gradients 7.5e-3 (Gemma at init range 0.2). Floor 1, as bfloat16: "
                         "measured, a q_proj gradient of scale 0.31 is off by 6.7e-3, 2.2% of its own "
                         "scale, which is rounding of order-one upstream values; parameters: no bound, "
                         "training is refused (measured: NaN in both twins after one AdamW step, all 7 "
                         "families x 3 heads: epsilon 1e-8 rounds to 0 in float16 and an element with no "
                         "gradient steps by 0 / 0)"),
    # Mixed precision and reduced float32 matmuls: `row_name` picks these rows. Their floor is 1, the
    # rule (max(1, max|ref|)) they were set under: not re-measured with a smaller floor.
    "bfloat16/float32": Tolerance(6e-2, 6e-2, 2e-2, 2e-1, PARAMETERS_BF16, 1.0,
                                  "bfloat16 activations, float32 parameters cast to bfloat16 at use: every "
                                  "product still rounds in bfloat16, so the bfloat16 mechanism applies; demo "
                                  "worst (9 models, CPU): activations 3.1e-2, logits 3.2e-2, loss 4.0e-4, "
                                  "gradients 7.1e-2 (Gemma's tied embedding, whose float32 gradient sums the "
                                  "lookup's and the LM head's; pure bfloat16 on the same weights: 2.9e-2), so "
                                  "gradients get 2e-1, ~3x room; mixed-precision training (float32 master "
                                  "weights and AdamW moments): " + PARAMETERS_BF16_REASON.format(
                                      worst="8.5e-3 (llama3's k_proj bias, whose rotary pairs barely turn)")),
    # Not twin against twin: one twin in mixed precision against the same twin in float32 (how far
    # bfloat16 products move a float32 run), so mixed-precision training can be held to float32.
    "bfloat16/float32 vs float32": Tolerance(
        6e-2, 6e-2, 3e-2, 1e-1, PARAMETERS_BF16, 1.0,
        "one twin in mixed precision (bfloat16 products, float32 parameters and AdamW moments) against "
        "the same weights in float32: the bfloat16 row's rounding, with no second framework. Measured "
        "(7 families x 3 heads, CPU): forward and backward of the torch twin, activations 3.2e-2, logits "
        "2.5e-2, loss 3.3e-3, gradients 4.1e-2; over 10 training-check steps in each twin, loss 1.1e-2, "
        "grad norm 3.4e-2, parameters 6.8e-3 (llama3's k_proj bias); ~2x room, parameters as the bfloat16 row"),
    "float32@tf32": Tolerance(1e-2, 1e-2, 4e-3, 1e-2, 1.0, 1.0,  # parameters: not measured
                              "float32 with TF32 matmuls in both twins (10-bit mantissa inputs, ulp 2^-10 = "
                              "1e-3), each twin's TF32 rounding its own; measured by `make gpu-check "
                              "--matmul-precisions tf32` on one H100 (torch 2.11 on CUDA, JAX 0.11.2 on the GPU, "
                              "9 demo models): activations 2.6e-3 (gemma2), logits 2.7e-3 (mistral, gemma), loss "
                              "1.1e-4, gradients 4.4e-3 (gemma); ~4x room, gradients ~2x; parameters after "
                              "training steps: not measured (1.0, no bound)"),
    "float32@bf16x3": Tolerance(1e-4, 1e-4, 1e-4, 1e-3, 1.0, 1.0,  # parameters: not measured
                                "float32 with XLA's bf16x3 dots (three bfloat16 products, ~2^-16 relative "
                                "error each) against torch's float32 (torch has no bf16x3); 10x the float32 "
                                "row. Measured on one H100 (JAX 0.11.2, 9 demo models): activations 6e-6 to "
                                "5.5e-5 and gradients 1.4e-6 to 8.7e-5, as bf16x3 promises, but logits 7.2e-4 "
                                "to 7.5e-3 (and one model's activations 1.2e-3), 1.5-3x TF32's, which three "
                                "bfloat16 passes never give: some dots did not get the three-pass algorithm on "
                                "that GPU, so those rows fail and the bound is NOT widened to them. On CPU XLA "
                                "computes it in float32, and the float32 figures apply; parameters after "
                                "training steps: not measured (1.0, no bound)"),
}


def row_name(dtype: str, param_dtype: str | None = None, matmul_precision: str = "highest") -> str:
    """The row of a run: `dtype`; `dtype/param_dtype` when the parameters are stored in another
    dtype than the activations; `float32@mode` for float32 matmuls in a reduced mode (tf32,
    bf16x3; other dtypes have no such mode and keep their row)."""
    if param_dtype is not None and param_dtype != dtype:
        return f"{dtype}/{param_dtype}"
    if dtype == "float32" and matmul_precision != "highest":
        return f"float32@{matmul_precision}"
    return dtype


def tolerance(dtype: str, quantity: str, value: float | None = None) -> Bound:
    """The bound for `quantity` in row `dtype` (a dtype name: float64, float32, bfloat16,
    float16, or a `row_name` such as "bfloat16/float32" or "float32@tf32"), with the row's floor
    (`PARAMETERS_FLOOR` for "parameters"); `value` replaces the table's number (a user override),
    not the floor."""
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerances for {dtype!r}; one of {tuple(TOLERANCES)}")
    row = TOLERANCES[dtype]
    floor = PARAMETERS_FLOOR if quantity == "parameters" else row.floor
    return Bound(row.for_quantity(quantity) if value is None else value, floor)


def _bound_text(value: float) -> str:
    # NaN is "no bound": what the table holds where the check refuses to run (float16 training).
    return "none" if math.isnan(value) else f"{value:.0e}"


def format_table() -> str:
    """The table as aligned text (what `twinlm check --tolerances` prints)."""
    header = ("dtype",) + QUANTITIES + ("floor", "why")
    rows = [(name,) + tuple(_bound_text(t.for_quantity(q)) for q in QUANTITIES) + (f"{t.floor:g}", t.reason)
            for name, t in TOLERANCES.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in [header] + rows]
    return "\n".join(lines + ["", f"parameters: {PARAMETERS_REASON}."])


def markdown_table() -> str:
    """The table as Markdown, the form README.md shows (`python -m parity.tolerances`)."""
    lines = ["A tensor passes when `max|torch - flax| <= bound * max(floor, max|torch|)` (parameters: floor "
             f"{PARAMETERS_FLOOR:g}).", "",
             "| dtype | " + " | ".join(QUANTITIES) + " | floor | why |", "|---" * (len(QUANTITIES) + 3) + "|"]
    for name, t in TOLERANCES.items():
        bounds = " | ".join(_bound_text(t.for_quantity(q)) for q in QUANTITIES)
        lines.append(f"| {name} | {bounds} | {t.floor:g} | {t.reason} |")
    lines += ["", f"Parameters: {PARAMETERS_REASON}."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())

"""The twins line up statement by statement: a measured property, not a promise.

Every function and method defined in both twins is aligned statement by statement (the machinery
the explain pages use). A pair's unexplained rows — statements that differ with no known
framework idiom, or stand on one side alone — must stay within its allowance in
`parity/explain/allowances.py`, where each allowance carries its one-line framework reason.
"""

from __future__ import annotations

import pytest

from parity.explain.align import mirrored_pairs
from parity.explain.allowances import ALLOWANCES


@pytest.fixture(scope="module")
def pairs():
    return mirrored_pairs()


def _describe(pair) -> str:
    lines = []
    for r in pair.rows:
        if not r.counts:
            continue
        t = r.torch.text.strip().splitlines()[-1].strip() if r.torch else "-"
        f = r.flax.text.strip().splitlines()[-1].strip() if r.flax else "-"
        where = f"torch L{r.torch.first}" if r.torch else f"flax L{r.flax.first}"
        lines.append(f"      {r.status:7s} {where}: {t[:60]!s}  |  {f[:60]!s}")
    return "\n".join(lines)


def test_every_pair_stays_within_its_allowance(pairs):
    drifted = []
    for p in pairs:
        allow = ALLOWANCES.get(p.id)
        bound = allow.rows if allow else 0
        if p.drift > bound:
            reason = f" ({allow.reason})" if allow else " (no allowance: the pair must line up)"
            drifted.append(f"  {p.id}: {p.drift} unexplained rows > allowance {bound}{reason}\n{_describe(p)}")
    assert not drifted, (
        f"{len(drifted)} mirrored pair(s) drifted past their allowance. Line the statements up, or, for an honest "
        "framework difference, raise the pair's entry in parity/explain/allowances.py with a one-line reason "
        "(python -m parity.explain prints every pair's figures):\n" + "\n".join(drifted))


def test_every_allowance_names_a_pair_and_a_reason(pairs):
    ids = {p.id for p in pairs}
    stale = sorted(set(ALLOWANCES) - ids)
    assert not stale, f"allowances for pairs that no longer exist (remove them from parity/explain/allowances.py): {stale}"
    for key, allow in ALLOWANCES.items():
        assert allow.rows > 0, f"{key}: an allowance of 0 is the default; remove the entry"
        assert allow.reason.strip() and "\n" not in allow.reason, f"{key}: the reason must be one line"

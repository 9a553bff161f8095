"""The mutation harness: plant each listed bug in a temporary copy of the repository, run the
test suite against it, and report whether the suite caught it (and with which test).

    python -m tests.mutation                 # every mutant, the whole suite for each (make mutants)
    python -m tests.mutation --check         # only verify every snippet is still found (seconds)
    python -m tests.mutation -k rope -k beam # mutants whose name contains a word
    python -m tests.mutation --guards-only   # quick: only each mutant's guard tests (not the default)

For each mutant the whole suite runs with `-x` under the CI profile, the mutant's guard tests
first (a plugin reorders the collected items, it drops none), so a caught mutant stops at its
first failing test and an uncaught one costs one full suite run. A mutant whose original snippet
is no longer found exactly once in its file is reported "stale": the code moved on and the list
(tests/mutation/mutants.py) must be updated. Exit status 0 only when every mutant is caught.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "__pycache__", ".hypothesis", ".pytest_cache", "reports", "build"}


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # caught, not caught, stale, timeout
    detail: str  # the catching test, or why it is stale
    seconds: float


def repo_files(root: Path) -> list[Path]:
    """Tracked and untracked-but-not-ignored files (the working tree as git sees it)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                             check=True, capture_output=True).stdout.decode()
        files = [root / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but caches
        files = [p for p in root.rglob("*") if p.is_file() and not SKIP_DIRS & set(p.relative_to(root).parts)]
    return [p for p in files if p.is_file()]


def copy_repo(root: Path, dest: Path) -> None:
    for p in repo_files(root):
        target = dest / p.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, target)


def stale_reason(root: Path, mutant: Mutant) -> str:
    """Empty when every edit's original snippet occurs exactly once in its file."""
    for e in mutant.edits:
        path = root / e.file
        if not path.is_file():
            return f"{e.file}: file not found"
        n = path.read_text(encoding="utf-8").count(e.original)
        if n != 1:
            return f"{e.file}: original snippet found {n} times (expected once): {e.original.strip()[:70]!r}"
    return ""


FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)(?: - (.*))?$", re.M)


def run_mutant(copy: Path, mutant: Mutant, tests: list[str], guards_only: bool, timeout: float,
               verbose: bool = False) -> Outcome:
    originals = {}
    for e in mutant.edits:
        path = copy / e.file
        text = originals.setdefault(path, path.read_text(encoding="utf-8"))
        path.write_text(path.read_text(encoding="utf-8").replace(e.original, e.mutated, 1), encoding="utf-8")
    env = dict(os.environ, CI="true", PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1",
               TWINLM_MUTANT_GUARDS="\n".join(mutant.guards))
    targets = list(mutant.guards) if guards_only else tests
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider",
           "-p", "tests.mutation.order", *targets]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        output = proc.stdout + proc.stderr
        if proc.returncode == 0:
            outcome = Outcome(mutant, "not caught", "", seconds)
        else:
            hit = FAILED.search(output)
            if hit:
                detail = hit.group(1) + (f"  [{hit.group(2)[:100]}]" if verbose and hit.group(2) else "")
            else:
                detail = f"pytest exit {proc.returncode}: " + output.strip().splitlines()[-1][:120]
            outcome = Outcome(mutant, "caught", detail, seconds)
    except subprocess.TimeoutExpired:
        outcome = Outcome(mutant, "timeout", f"no verdict after {timeout:.0f} s", time.perf_counter() - start)
    finally:
        for path, text in originals.items():
            path.write_text(text, encoding="utf-8")
    return outcome


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", action="append", default=[], help="only mutants whose name contains this (repeatable)")
    ap.add_argument("--check", action="store_true", help="only report stale mutants, run nothing")
    ap.add_argument("--guards-only", action="store_true", help="run only each mutant's guard tests (quick, weaker)")
    ap.add_argument("--tests", nargs="+", default=["tests"], help="the suite (default: tests)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mutant (default 1800)")
    ap.add_argument("--list", action="store_true", help="print the mutants and why each is realistic")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the catching test's failure message")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.k or any(k in m.name for k in args.k)]
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.why}\n    files: {', '.join(e.file for e in m.edits)}\n    guards: {', '.join(m.guards)}")
        return 0
    stale = {m.name: stale_reason(ROOT, m) for m in mutants}
    stale = {k: v for k, v in stale.items() if v}
    for name, why in stale.items():
        print(f"STALE      {name}: {why}")
    if args.check:
        print(f"{len(mutants) - len(stale)}/{len(mutants)} mutants apply; {len(stale)} stale")
        return 1 if stale else 0
    outcomes = [Outcome(m, "stale", stale[m.name], 0.0) for m in mutants if m.name in stale]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="twinlm-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repo(ROOT, copy)
        for m in mutants:
            if m.name in stale:
                continue
            o = run_mutant(copy, m, args.tests, args.guards_only, args.timeout, args.verbose)
            outcomes.append(o)
            print(f"{o.status.upper():10s} {m.name:34s} {o.seconds:6.1f} s  {o.detail}", flush=True)
    total = time.perf_counter() - start
    ran = [o for o in outcomes if o.status != "stale"]
    caught = sum(o.status == "caught" for o in ran)
    print(f"\n{caught}/{len(ran)} caught ({100.0 * caught / max(len(ran), 1):.0f}%), "
          f"{len(ran) - caught} not caught, {len(stale)} stale; {total:.0f} s in all"
          + (" (guard tests only)" if args.guards_only else ""))
    return 0 if caught == len(ran) and not stale else 1

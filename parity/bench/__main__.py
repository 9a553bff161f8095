"""`python -m parity.bench [SECTION ...]` (`make bench`): run the named sections, or all of them,
and print one table."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from parity.bench import ON_REQUEST, SECTION_MODULES, SECTIONS, Row, options, print_table


def main(argv: list[str] | None = None) -> int:
    """Run the sections named in `argv` (all when none) and print the table; 2 on an unknown name."""
    for module in SECTION_MODULES:  # each registers its sections when imported
        importlib.import_module(module)
    parser = argparse.ArgumentParser(
        prog="python -m parity.bench",
        description="Measured figures of twinlm, printed as one aligned table. "
                    f"Sections: {', '.join(s for s in SECTIONS if s not in ON_REQUEST)}; "
                    f"only when named: {', '.join(s for s in SECTIONS if s in ON_REQUEST)}.",
        epilog="examples: python -m parity.bench convert load; "
               "python -m parity.bench side_by_side --device cuda")
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help="sections to run, in this order (default: all but the ones run only when named)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where side_by_side and load run (default cpu; cuda: the 1.1B bf16 GPU rows)")
    args = parser.parse_args(argv)
    options().device = args.device
    names = args.sections or [s for s in SECTIONS if s not in ON_REQUEST]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {', '.join(unknown)}; available: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    rows: list[Row] = []
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for name in names:
        rows += SECTIONS[name]()
    # Timings are only comparable on a quiet machine: say how busy this one was.
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows.append(Row("machine", f"{os.cpu_count()} CPUs, 1-min load average before / after",
                    f"{load_before:.1f} / {load_after:.1f}"))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

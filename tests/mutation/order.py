"""pytest plugin of the mutation harness: run a mutant's guard tests first.

`TWINLM_MUTANT_GUARDS` holds node-id prefixes, one per line; collected items matching one move
to the front, in the order of the prefixes; nothing is dropped, so the run is still the whole
suite, only reordered (with `-x` it stops at the first failure).
"""

from __future__ import annotations

import os


def pytest_collection_modifyitems(session, config, items):
    guards = [g for g in os.environ.get("TWINLM_MUTANT_GUARDS", "").splitlines() if g]
    if not guards:
        return

    def rank(item) -> int:
        return next((i for i, g in enumerate(guards) if item.nodeid.startswith(g)), len(guards))

    items.sort(key=rank)  # stable: the suite's own order within each group

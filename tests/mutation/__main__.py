"""`python -m tests.mutation`: see `tests.mutation.harness`."""

import sys

from .harness import main

sys.exit(main())

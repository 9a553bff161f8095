"""`python -m parity.explain`: every mirrored pair's alignment figures next to its allowance."""

from .align import main

main()

"""`twinlm explain`: the two twins side by side, statement by statement, with their measured
differences; and the HTML parity report.

- `align`: statement alignment of every mirrored torch / Flax function pair (on the syntax tree,
  framework idioms normalised by `idioms`), bounded per pair by `allowances.ALLOWANCES`.
"""

from .align import Pair, align_pair, mirrored_pairs
from .allowances import ALLOWANCES, Allowance
from .idioms import IDIOMS, Idiom

__all__ = ["ALLOWANCES", "Allowance", "IDIOMS", "Idiom", "Pair", "align_pair", "mirrored_pairs"]

"""`twinlm explain`: the two twins side by side, statement by statement, with their measured
differences; and the HTML parity report.

- `align`: statement alignment of every mirrored torch / Flax function pair (on the syntax tree,
  framework idioms normalised by `idioms`), bounded per pair by `allowances.ALLOWANCES`;
- `components`: the pages in data-flow order and what each shows; `params`: the parameter
  tables; `measured`: a report's figures per component; `site.write_site`: the static site;
- `html`: the stylesheet, highlighting and SVG charts the pages share.
"""

from .align import Pair, align_pair, mirrored_pairs
from .allowances import ALLOWANCES, Allowance
from .components import COMPONENTS, Component
from .idioms import IDIOMS, Idiom
from .measured import load_reports
from .site import write_site

__all__ = ["ALLOWANCES", "Allowance", "COMPONENTS", "Component", "IDIOMS", "Idiom", "Pair", "align_pair",
           "load_reports", "mirrored_pairs", "write_site"]

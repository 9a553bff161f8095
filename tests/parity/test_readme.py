"""README.md shows the tolerance table that the code applies, generated from parity/tolerances.py."""

from parity.tolerances import markdown_table
from tests.helpers.configs import REPO_ROOT

README = REPO_ROOT / "README.md"


def test_readme_tolerance_table_is_the_one_in_the_code():
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- tolerances:begin -->", 1)[1].split("<!-- tolerances:end -->", 1)[0]
    assert block.strip() == markdown_table(), "regenerate with: python -m parity.tolerances"

"""The mutation harness (`make mutants`): realistic bugs the test suite must catch.

`mutants.py` is the list; `harness.py` plants each bug in a temporary copy of the repository and
runs the suite; `order.py` is the pytest plugin that runs a mutant's guard tests first.
"""

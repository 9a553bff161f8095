"""The transformers witness: skipped on a developer's machine without transformers, a failure in CI.

Hugging Face `transformers` is the independent implementation the twins are held to (families,
rotary scalings, beam search). A CI run (`CI` set) that silently skipped it would report green
while checking nothing of the kind, so there a missing install fails the test instead.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest

__all__ = ["require_transformers"]


def require_transformers() -> ModuleType:
    """`import transformers`; when it is missing: skip, or under `CI` fail naming the fix."""
    try:
        import transformers
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"transformers is not installed ({e}); the CI run needs its witness tests: "
                        "pip install -e '.[test]'", pytrace=False)
        pytest.skip("transformers is not installed (the witness tests need it; CI fails instead)")
    return transformers

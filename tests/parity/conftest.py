"""The tiny causal-LM checkpoint the parity and CLI tests read (built once; no test writes it)."""

import pytest

from parity.demo import DemoModel, build_checkpoint
from tests.helpers.configs import TINY_DEMO


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """Directory of the `TINY_DEMO` causal LM, saved by `parity.demo.build_checkpoint`."""
    return build_checkpoint(DemoModel("tiny", "causal_lm", TINY_DEMO), tmp_path_factory.mktemp("ckpt") / "tiny")

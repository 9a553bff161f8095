"""Tests of `parity/`: inputs, check, report, record, the public testing API and the CLI."""

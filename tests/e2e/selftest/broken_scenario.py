"""A scenario that fails on purpose. Not collected by a normal run (the file name does not match
test_*.py): test_harness.py runs it in a separate pytest and checks that the run turns red with a
readable reason."""

from __future__ import annotations

import os

import pytest

from ..vm import Machine

pytestmark = pytest.mark.skipif(
    os.environ.get("LUKSVM_E2E_SELFTEST") != "1", reason="run by test_harness.py only"
)

MARKER = "E2E-SELFTEST: this scenario fails on purpose"


def test_meant_to_fail(machine: Machine) -> None:
    machine.boot(f"echo '{MARKER}'\nfalse\necho 'not reached'\n")

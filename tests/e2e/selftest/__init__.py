"""Scenarios that fail on purpose, run by test_harness.py in a separate pytest."""

from __future__ import annotations

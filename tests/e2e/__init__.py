"""Tier 3: a real Debian VM under QEMU (see README.md in this directory)."""

from __future__ import annotations

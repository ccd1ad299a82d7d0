"""Guest start gating and stop policies on real libvirt and QEMU, one boot, no units.

The seed's guests have no OS, so they ignore ACPI shutdown, like a hung guest.
"""

from __future__ import annotations

import pytest

from .vm import Machine, scenario

pytestmark = pytest.mark.e2e


def test_gating_parallel_stop_and_policies(host: Machine) -> None:
    result = host.boot(scenario("guests.sh"))
    steps = result.steps
    refusal = result.text("start-locked.err")
    assert "guest 'mail' not started" in refusal and "cr_imap_encr is locked" in refusal
    refused = result.entries(LUKSVM_GUEST="mail", LUKSVM_VOLUME="cr_imap_encr")
    assert refused and "is locked" in refused[0].message

    assert result.text("running-before-stop").split() == ["mail", "web"]
    assert steps["start-mail-again"].rc == 0

    # Two guests that ignore ACPI with stop_timeout 10 s: destroyed after about 10 s, not 20.
    assert result.text("running-after-stop").split() == []
    assert 10_000 <= steps["stop-both"].ms < 16_000, steps["stop-both"]
    destroyed = result.entries(r"destroying it \(on_timeout=destroy\)")
    assert sorted(e.get("LUKSVM_GUEST") for e in destroyed) == ["mail", "web"]
    apart = abs(destroyed[0].monotonic - destroyed[1].monotonic) / 1e6
    assert apart < 3, f"the two destroys were {apart:.1f} s apart: not in parallel"

    # on_timeout=fail: web stays running, its volume stays open, and the journal says why.
    assert "on_timeout=fail leaves it running" in result.text("stop-web-fail.err")
    assert steps["close-web-held"].rc != 0
    failed = result.entries(r"on_timeout=fail leaves it running", LUKSVM_GUEST="web")
    assert failed and "systemd still kills it" in failed[0].message

    # managedsave on the default save dir (unencrypted): refused, mail stays running, no image.
    assert "guest RAM" in result.text("stop-mail-managedsave.err")
    assert result.text("running-after-policies").split() == ["mail", "web"]
    assert result.text("save-dir.txt").strip() == ""

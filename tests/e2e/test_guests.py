"""Guest start gating and stop policies on real libvirt and QEMU, one boot, no units.

The seed's guests have no OS, so they ignore ACPI shutdown, like a hung guest.
"""

from __future__ import annotations

import pytest

from .vm import Machine, scenario

pytestmark = [pytest.mark.e2e, pytest.mark.stack]


def test_gating_parallel_stop_and_policies(host: Machine) -> None:
    result = host.boot(scenario("guests.sh"))
    steps = result.steps
    refusal = result.text("start-locked.err")
    assert "guest 'mail' not started" in refusal and "cr_imap_encr is locked" in refusal
    refused = result.entries(LUKSVM_GUEST="mail", LUKSVM_VOLUME="cr_imap_encr")
    assert refused and "is locked" in refused[0].message

    assert result.text("running-before-stop").split() == ["mail", "web"]
    assert steps["start-mail-again"].rc == 0

    # Two guests that ignore ACPI with stop_timeout 10 s: each waited 10 s, then was destroyed,
    # and the two waits overlapped (parallel), so the whole stop took about 10 s, not 20.
    assert result.text("running-after-stop").split() == []
    waits = {}
    for guest in ("mail", "web"):
        asked = result.journal.first(
            r"ACPI shutdown requested", boot=result.boot_id, LUKSVM_GUEST=guest
        )
        destroyed = result.journal.first(
            r"destroying it \(on_timeout=destroy\)", boot=result.boot_id, LUKSVM_GUEST=guest
        )
        waits[guest] = (asked.monotonic / 1e6, destroyed.monotonic / 1e6)
        # journald stamps each entry when it receives it, so the two stamps may lie a little
        # closer than the wait itself (seen: 9.989 s for a 10 s wait)
        assert 9.5 <= waits[guest][1] - waits[guest][0] < 13, waits
    assert max(a for a, _ in waits.values()) < min(d for _, d in waits.values()), (
        f"the waits did not overlap: not in parallel {waits}"
    )
    # The whole stop is judged by the journal above, not by wall time (a busy host stretches it).
    assert steps["stop-both"].rc == 0, steps["stop-both"]

    # on_timeout=fail: web stays running, its volume stays open, and the journal says why.
    assert "on_timeout=fail leaves it running" in result.text("stop-web-fail.err")
    assert steps["close-web-held"].rc != 0
    failed = result.entries(r"on_timeout=fail leaves it running", LUKSVM_GUEST="web")
    assert failed and "systemd still kills it" in failed[0].message

    # managedsave on the default save dir (unencrypted): refused, mail stays running, no image.
    assert "guest RAM" in result.text("stop-mail-managedsave.err")
    assert result.text("running-after-policies").split() == ["mail", "web"]
    assert result.text("save-dir.txt").strip() == ""

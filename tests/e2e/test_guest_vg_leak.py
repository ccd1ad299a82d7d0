"""The problem luksvm exists for, shown on a host without luksvm.

With the volumes in /etc/crypttab, a reboot opens them, and the host's LVM auto-activates the
guest's VG *inside* cr_imap_encr. While it is active, `cryptsetup close cr_imap_encr` fails: a
plain shutdown cannot close the volume. This test documents that world; if the image ever stops
showing it, the test fails, and luksvm's lock and shutdown tests would be proving nothing.
"""

from __future__ import annotations

import pytest

from .journal import assert_order
from .vm import Machine, scenario

pytestmark = [pytest.mark.e2e, pytest.mark.stack]

CRYPTTAB = """\
cr_imap_encr /dev/volgrp4/lvimap_hd0 /etc/luksvm/keys/imap.key luks
cr_web       /dev/volgrp4/lvweb_hd0  /etc/luksvm/keys/web.key  luks
"""


def test_host_lvm_activates_guest_vg_and_close_fails(host: Machine) -> None:
    first = host.boot(f"cat > /etc/crypttab <<'EOF'\n{CRYPTTAB}EOF\n")
    second = host.boot(scenario("guest-vg-leak.sh"))

    lvs = second.json("vgmail-lvs.json")["report"][0]["lv"]
    assert lvs == [{"vg_name": "vgmail", "lv_name": "root", "lv_active": "active"}], (
        "the host's LVM no longer auto-activates the guest VG inside cr_imap_encr after a reboot; "
        f"the world luksvm is built for has changed. lvs: {lvs}\n{second.text('dm-tree.txt')}"
    )
    assert int(second.text("open-count")) > 0
    assert second.steps["close-while-guest-vg-active"].rc != 0
    assert "in use" in second.text("close-while-guest-vg-active.err")
    assert second.steps["close"].rc == 0  # guest VG off first, then close: fine

    # The journal tells the story, in order: systemd-cryptsetup opens the volume, udev's pvscan
    # finds the guest's PV inside it, and LVM's event activation (a transient lvm-activate-vgmail
    # unit) activates the guest's VG.
    journal = second.journal
    boot = second.boot_id
    assert_order(
        journal.job_began("systemd-cryptsetup@cr_imap_encr.service", boot=boot),
        journal.first(r"PV /dev/dm-\d+ online, VG vgmail is complete", boot=boot),
        journal.job("lvm-activate-vgmail.service", boot=boot),
        journal.first(r"1 logical volume\(s\) in volume group \"vgmail\" now active", boot=boot),
    )
    # Every boot is in the journal, the first boot's shutdown included; the last boot's shutdown
    # is read from the powered-off disk.
    assert journal.boot_ids[-2:] == [first.boot_id, second.boot_id]
    journal.first("Reached target.*Shutdown", boot=first.boot_id)
    host.read_journal().first("Reached target.*Shutdown", boot=second.boot_id)

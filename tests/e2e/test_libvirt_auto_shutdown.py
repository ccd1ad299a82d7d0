"""libvirt's own shutdown of guests (libvirt >= 11.2, Debian 13) against luksvm's, two boots.

Boot 1 (scenarios/auto-shutdown-setup.sh): a luksvm host whose admin set
`auto_shutdown_poweroff = "all"` in qemu.conf. doctor FAILs and names the line; at that boot's
shutdown libvirt powers the guests off at logind's signal, before systemd stops luksvm's units:
luksvm's stop (ACPI, stop_timeout, its policy) never gets to run. Boot 2 (auto-shutdown-check.sh)
applies doctor's fix; doctor is clean, and that boot's shutdown (read from the powered-off disk)
is luksvm's: ACPI request, 5 s wait, destroy, the scope after, the volume closed after libvirt.
"""

from __future__ import annotations

import pytest

from .journal import Entry, Journal, assert_order
from .test_boot import guest_unit, scope_entries, seconds, unlock_unit
from .vm import BootResult, Machine, note, scenario

pytestmark = [pytest.mark.e2e, pytest.mark.release("trixie")]

GUESTS = {"mail": "cr_imap_encr", "web": "cr_web"}
STOP_TIMEOUT = 5.0  # [guests] stop_timeout in auto-shutdown-setup.sh


def test_libvirt_auto_shutdown_fails_doctor_and_preempts_luksvm(host: Machine) -> None:
    setup = host.boot(scenario("auto-shutdown-setup.sh"))
    check = host.boot(scenario("auto-shutdown-check.sh"))
    last = host.read_journal()

    assert setup.text("running").split() == ["mail", "web"]
    line = int(setup.text("poweroff-line"))
    assert setup.text("doctor-on-rc") == "2", setup.text("doctor-on.err")
    findings = {f["subject"]: f for f in setup.json("doctor-on.json")}
    poweroff = findings["auto_shutdown_poweroff"]
    assert poweroff["status"] == "FAIL"
    assert poweroff["message"].startswith(
        f'/etc/libvirt/qemu.conf:{line}: auto_shutdown_poweroff = "all": libvirt powers them off'
    )
    assert poweroff["fix"].startswith('set auto_shutdown_poweroff = "none"')
    assert findings["auto_shutdown_restore"]["status"] == "FAIL"
    note("libvirt auto-shutdown: doctor with poweroff=all", setup.text("doctor-on.txt"))

    preempted = check_libvirt_preempted_luksvm(check.journal, setup)

    assert check.text("running").split() == ["mail", "web"]
    assert check.text("doctor-off-rc") == "0", check.text("doctor-off.err")
    (clean,) = check.json("doctor-off.json")
    assert clean["status"] == "OK" and clean["message"].startswith("libvirt 11."), clean
    assert "(try_save=none, try_shutdown=none, poweroff=none)" in clean["message"]
    check_luksvm_order(last, check)
    note(
        "libvirt auto-shutdown, boot 1's shutdown (poweroff=all)",
        preempted + f"; versions: {setup.text('versions.txt')}",
    )


def shutdown_of(journal: Journal, result: BootResult) -> list[Entry]:
    end = journal.first(r"^E2E-RC:", boot=result.boot_id)
    entries = [e for e in journal.find(boot=result.boot_id) if e.monotonic > end.monotonic]
    assert entries, f"boot {result.boot_id}'s shutdown is not in the journal"
    return entries


def check_libvirt_preempted_luksvm(journal: Journal, setup: BootResult) -> str:
    """Boot 1's shutdown: libvirt powered the guests off before luksvm's units stopped; luksvm
    found them gone and never asked them over ACPI, never waited, never applied its policy."""
    entries = shutdown_of(journal, setup)
    text = "\n".join(map(str, entries))
    boot = setup.boot_id
    end = entries[0].monotonic
    seen = []
    for guest in GUESTS:
        asked = [e for e in journal.find(r"ACPI shutdown requested", boot=boot, LUKSVM_GUEST=guest)]
        assert not [e for e in asked if e.monotonic >= end], f"luksvm stopped {guest}\n{text}"
        gone = journal.last(r"is not running", boot=boot, LUKSVM_GUEST=guest)
        began = journal.job_began(guest_unit(guest), "stop", boot=boot)
        scope = scope_entries(journal, guest, boot)
        assert scope, f"no entries about {guest}'s machine scope\n{text}"
        # the QEMU was gone (its scope over) before luksvm's stop job for it even began
        assert_order(scope[-1], began, gone)
        seen.append(
            f"{guest}: scope gone {seconds(began) - seconds(scope[-1]):.1f} s before luksvm"
        )
    return "; ".join(seen)


def check_luksvm_order(journal: Journal, check: BootResult) -> None:
    """Boot 2's shutdown with libvirt's own shutdown off: luksvm's policy, in order."""
    entries = shutdown_of(journal, check)
    text = "\n".join(map(str, entries))
    boot = check.boot_id
    end = entries[0].monotonic
    libvirtd = journal.job("libvirtd.service", "stop", boot=boot)
    for guest, volume in GUESTS.items():
        asked = journal.last(r"ACPI shutdown requested", boot=boot, LUKSVM_GUEST=guest)
        destroyed = journal.last(
            r"destroying it \(on_timeout=destroy\)", boot=boot, LUKSVM_GUEST=guest
        )
        assert asked.monotonic > end, f"{guest}: not stopped by luksvm at shutdown\n{text}"
        waited = seconds(destroyed) - seconds(asked)
        assert STOP_TIMEOUT - 0.5 <= waited < STOP_TIMEOUT + 8, (guest, waited)
        scope = scope_entries(journal, guest, boot)
        assert scope and not [e for e in scope if "SIGKILL" in e.message], scope
        assert_order(destroyed, scope[-1])
        assert_order(journal.last(about=guest_unit(guest), JOB_TYPE="stop", boot=boot), libvirtd)
        locked = journal.last(r": locked$", boot=boot, LUKSVM_VOLUME=volume)
        assert_order(libvirtd, locked, journal.job(unlock_unit(volume), "stop", boot=boot))

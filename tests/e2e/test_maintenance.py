"""Header backups and trim with luksvm applied on the seed host, in one boot
(scenarios/maintenance.sh): the maintenance units as systemd runs them, the discard chain that
`luksvm trim` reports against what the kernel and libvirt do, and a backup dir that would lie
inside the volume it backs up."""

from __future__ import annotations

from typing import Any

import pytest

from .seed import SeedHost
from .vm import BootResult, Machine, scenario

pytestmark = pytest.mark.e2e

VOLUMES = ("cr_imap_encr", "cr_web")
GUEST_OF = {"cr_imap_encr": "mail", "cr_web": "web"}


def backups(result: BootResult, name: str) -> list[list[str]]:
    """Rows of NAME.tsv: path under the backup dir, isLuks rc, LUKS UUID, mode."""
    return [line.split("\t") for line in result.text(name).splitlines()]


def chain(report: dict[str, Any], guest: str) -> dict[str, Any]:
    entry = next(g for g in report["guests"] if g["guest"] == guest)
    (disk,) = entry["disks"]
    return {"trim": entry["trim"], "detail": entry["detail"], **disk}


def links(disk: dict[str, Any]) -> dict[str, Any]:
    return {link["link"]: link for link in disk["links"]}


def test_header_backup_and_trim_units(host: Machine, seed_host: SeedHost) -> None:
    result = host.boot(scenario("maintenance.sh"), timeout=420)
    journal, boot = result.journal, result.boot_id
    uuids = {name: seed_host.info["volumes"][name]["luks_uuid"] for name in VOLUMES}

    # The units as apply installed them are valid.
    assert result.text("verify.txt") == "", result.text("verify.txt")
    assert "Persistent=yes" in result.text("backup-timer.txt")

    # The timer made up for the missed weekly run at once, and the service backed up both
    # volumes: one verified LUKS header file per volume, with the volume's UUID, root's alone.
    journal.job("luksvm-header-backup.service", boot=boot)
    assert "Result=success" in result.text("backup-service-1.txt")
    first = backups(result, "backups-1.tsv")
    assert sorted(row[0].split("/")[0] for row in first) == sorted(VOLUMES), first
    for path, is_luks, uuid, mode in first:
        volume = path.split("/")[0]
        assert is_luks == "0" and mode == "600", (path, is_luks, mode)
        assert uuid == uuids[volume] and path.endswith(f"_{uuid}.luksheader"), (path, uuid)
    assert result.text("backup-modes.txt").split() == [
        "/var/lib/luksvm/header-backups", "700",
        "/var/lib/luksvm/header-backups/cr_imap_encr", "700",
        "/var/lib/luksvm/header-backups/cr_web", "700",
    ]  # fmt: skip
    for volume in VOLUMES:
        written = journal.find(
            r"backed up the LUKS2 header", boot=boot, LUKSVM_VOLUME=volume,
            unit="luksvm-header-backup.service",
        )  # fmt: skip
        assert len(written) == 1, written

    # A second run: headers unchanged, nothing new.
    assert result.steps["backup-again"].rc == 0
    assert backups(result, "backups-2.tsv") == first
    files = {path for row in first for path in (row[0], row[0] + ".json")}
    assert set(result.text("backup-files-2.txt").split()) == files | {".lock"}

    # Trim: the volumes are unlocked by their units; cr_imap_encr with `discard`, cr_web without.
    facts = {}
    for line in result.text("discard-facts.tsv").splitlines():
        name, crypt, lv, disk, allow = line.split("\t")
        facts[name] = {"crypt": int(crypt), "lv": int(lv), "disk": int(disk), "allow": allow}
    assert facts["cr_imap_encr"]["allow"] == "1" and facts["cr_imap_encr"]["crypt"] > 0, facts
    assert facts["cr_web"]["allow"] == "0" and facts["cr_web"]["crypt"] == 0, facts

    # Without discard='unmap' on the domain disks the chain breaks at the domain, for both.
    without = result.json("trim-without-unmap.json")
    assert result.text("trim-without-unmap.rc") == "1"
    for volume in VOLUMES:
        disk = chain(without, GUEST_OF[volume])
        assert disk["trim"] == "not running" and disk["volume"] == volume
        assert disk["broken"] == "domain disk", disk
        assert "discard='(unset)'" in links(disk)["domain disk"]["detail"]

    # With it, the domain link passes; then dm-crypt decides, as the kernel's mapping table does.
    assert "discard='unmap'" in result.text("mail-driver.xml")
    with_unmap = result.json("trim-with-unmap.json")
    for volume in VOLUMES:
        disk = chain(with_unmap, GUEST_OF[volume])
        by_name = links(disk)
        assert by_name["domain disk"]["ok"] is True, disk
        assert by_name["dm-crypt"]["ok"] is (facts[volume]["allow"] == "1"), (disk, facts)
        below_ok = facts[volume]["lv"] > 0 and facts[volume]["disk"] > 0
        assert by_name["backing device"]["ok"] is below_ok, (disk, facts)
    mail = chain(with_unmap, "mail")
    assert mail["ok"] is (facts["cr_imap_encr"]["lv"] > 0 and facts["cr_imap_encr"]["disk"] > 0)
    web = chain(with_unmap, "web")
    assert web["broken"] == "dm-crypt"
    assert "cr_web is open without discards" in links(web)["dm-crypt"]["detail"]
    assert "add discard to the options of cr_web" in links(web)["dm-crypt"]["fix"]
    assert result.text("trim-with-unmap.rc") == "1"
    assert result.text("trim-service-rc") == "0"  # SuccessExitStatus=1: a report, not a failure

    # A running guest without an agent: the real libvirt error reads as "agent missing".
    running = chain(result.json("trim-running.json"), "mail")
    assert running["trim"] == "agent missing", running
    assert "qemu-guest-agent" in running["detail"]

    # A backup dir inside cr_imap_encr (on the guest's own filesystem) is refused, by the command
    # and by the unit, and nothing is created there.
    refusal = result.text("backup-on-volume.err")
    assert "backup dir /mnt/mailroot/luksvm-backups is on the encrypted volume cr_imap_encr" in (
        refusal
    )
    assert "vgmail-root" in refusal and "set [backup] dir" in refusal, refusal
    assert result.text("backup-service-on-volume-rc") != "0"
    assert result.text("backup-dir-created") == "no"
    journal.first(
        r"is on the encrypted volume cr_imap_encr", boot=boot, unit="luksvm-header-backup.service"
    )

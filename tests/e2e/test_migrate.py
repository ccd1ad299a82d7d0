"""luksvm migrate in the VM, with data (scenarios/migrate.sh, then migrate-check.sh after a
reboot): a raw and a qcow2 guest disk onto new LUKS2 LVs; one run killed during the copy and run
again; after the reboot luksvm unlocks both volumes and starts both guests from them, the files
are the originals, and --rollback gives back the previous domain XML exactly."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from .vm import BootResult, Machine, note, scenario

pytestmark = pytest.mark.e2e

MiB = 1024**2
GUESTS = {"plain": ("raw", 256 * MiB), "q2": ("qcow2", 64 * MiB)}
LUKS2_OFFSET = 16 * MiB


def test_migrate_raw_and_qcow2_guests_with_data(host: Machine) -> None:
    work = host.boot(scenario("migrate.sh"), timeout=900)
    check_work(work)

    files = {
        name: work.path(name)
        for name in ("plain.sha256", "q2.sha256", "plain-image.size", "plain-image.sha256")
    }
    after = host.boot(scenario("migrate-check.sh"), files=files, timeout=600)
    check_after_reboot(work, after)

    note(
        "migrate: boots (work, check)",
        f"{work.seconds:.0f} s, {after.seconds:.0f} s; resumed raw 256 MiB "
        f"{work.steps['plain-resume'].ms} ms, qcow2 64 MiB {work.steps['q2-migrate'].ms} ms",
    )


def disk_of(xml: str) -> ET.Element:
    disk = ET.fromstring(xml).find("./devices/disk")
    assert disk is not None
    return disk


def identity(xml: str) -> tuple[str | None, list[str | None]]:
    domain = ET.fromstring(xml)
    macs = [mac.get("address") for mac in domain.iter("mac")]
    return domain.findtext("uuid"), macs


def check_work(work: BootResult) -> None:
    assert "luksFormat" in work.text("plain-dry-run.txt")

    # killed during the copy: the record says the LV was made, formatted and opened, not copied
    assert work.text("plain-killed-rc") == "137", work.text("plain-killed.txt")
    killed = work.json("plain-state-killed.json")
    assert "open" in killed["done"] and "copy" not in killed["done"], killed
    resumed = work.text("plain-resume.txt")
    assert "resuming the migration" in resumed
    assert "verified: all" in resumed
    assert work.steps["plain-again"].rc == 0
    assert "nothing to do" in work.text("plain-again.txt")

    lvs = {lv["lv_name"]: int(lv["lv_size"]) for lv in work.json("lvs.json")["report"][0]["lv"]}
    for guest, (driver, size) in GUESTS.items():
        # disk + LUKS2 header, in whole 4 MiB extents
        assert lvs[f"lv{guest}"] == size + LUKS2_OFFSET, lvs
        dump = work.text(f"{guest}.luksdump.txt")
        assert f"offset: {LUKS2_OFFSET} [bytes]" in dump
        assert "sector: 512 [bytes]" in dump

        before, after = work.text(f"{guest}.before.xml"), work.text(f"{guest}.after.xml")
        assert identity(after) == identity(before)  # same UUID, same MAC
        assert identity(before)[1] == [f"52:54:00:e2:e0:0{1 if guest == 'plain' else 2}"]
        disk = disk_of(after)
        assert disk.get("type") == "block"
        source, driver_el = disk.find("source"), disk.find("driver")
        assert source is not None and driver_el is not None
        assert source.attrib == {"dev": f"/dev/mapper/cr_{guest}"}
        assert (driver_el.get("type"), driver_el.get("discard")) == ("raw", "unmap")
        assert disk.find("backingStore") is None or not list(disk.find("backingStore") or [])
        assert disk_of(before).find("source").get("file").endswith(f"{guest}.{driver}")  # type: ignore[union-attr]
        # what migrate kept for --rollback is what the domain was
        assert work.text(f"{guest}.previous.xml") == before

        fragment = [line for line in work.text(f"{guest}.fragment").splitlines()
                    if not line.startswith("#")]  # fmt: skip
        assert fragment == [
            f"cr_{guest} /dev/volgrp4/lv{guest} /etc/luksvm/keys/{guest}.key "
            f"luks,discard,x-luksvm.guest={guest}"
        ]
        assert work.text(f"{guest}.unit-active") == "active"

    assert work.text("plain-image-after.sha256") == work.text("plain-image.sha256")

    # doctor's real findings for the new volume and guest close the run
    migrated = work.text("q2-migrate.txt")
    assert "not part of this build" not in migrated
    report = migrated.split("doctor says about cr_q2 and q2:\n", 1)[1]
    assert "cr_q2" in report and " failed, " in report, migrated
    assert "Start the guest: systemctl start luksvm-guest@q2.service" in migrated


def check_after_reboot(work: BootResult, after: BootResult) -> None:
    for guest in GUESTS:
        assert after.text(f"{guest}.unit-active") == "active", after.text("units.log")
        assert after.text(f"{guest}.state") == "running", after.text("units.log")
        assert f"/dev/mapper/cr_{guest}" in after.text(f"{guest}.blklist")
        assert after.text(f"{guest}.state-after-stop") == "shut off"
        assert after.steps[f"sha256-{guest}"].rc == 0
    # the whole guest-visible disk, byte for byte
    assert after.text("plain-mapping.sha256") == work.text("plain-image.sha256")

    # refused while plain ran; after `virsh destroy` its guest unit stayed active (RemainAfterExit)
    assert 'cannot lock cr_plain: still held by QEMU of guest "plain"' in after.text(
        "lock-running.err"
    )
    assert "guest plain is running; shut it off first" in after.text("rollback-running.err")
    assert after.text("plain.guest-unit-after-destroy") == "active"
    assert (
        "guest plain is shutoff in libvirt; stopping its stale unit luksvm-guest@plain.service"
        in after.text("plain.rollback.txt")
    )
    assert after.text("plain.guest-unit-after-rollback") == "inactive"
    for guest in GUESTS:
        assert after.steps[f"rollback-{guest}"].rc == 0
        assert after.text(f"{guest}.rolled-back.xml") == work.text(f"{guest}.before.xml")
        assert after.text(f"{guest}.mapping-after-rollback") == "closed"
        assert f"60-migrate-cr_{guest}.conf" not in after.text(f"{guest}.fragments-after-rollback")
        assert f"lvremove volgrp4/lv{guest}" in after.text(f"{guest}.rollback.txt")
    kept = {lv["lv_name"] for lv in after.json("lvs-after-rollback.json")["report"][0]["lv"]}
    assert {"lvplain", "lvq2"} <= kept  # rollback never deletes the new LV

"""Unattended keys on a real host, over three boots of one machine with a TPM 2.0 (swtpm on the
machine running QEMU) and a Tang server on loopback inside it.

Boot 1 (scenarios/unattended-setup.sh): cr_imap_encr (guest mail) enrolled to the TPM2 plus a
recovery key, its keyfile's keyslot removed (stale header backups named by doctor, then pruned);
cr_web (guest web) enrolled to Tang; their keyfiles gone from the configuration and the disk.
Boot 2 (unattended-check.sh): both unlock with no prompt, the guests run, the journal names each
volume's key source. Boot 3 (unattended-fallback.sh): a fresh TPM and Tang down: both volumes fail
within their bound and never prompt, multi-user is reached, cr_other is unaffected; the recovery
key typed on a terminal brings guest mail up.
"""

from __future__ import annotations

import json
import re

import pytest

from .journal import Journal
from .vm import Machine, note, scenario

pytestmark = pytest.mark.e2e

HERE = scenario("unattended-setup.sh").parents[1]
# [keys] unattended_timeout in unattended-setup.sh: 20 s was seen too short for `clevis luks pass`
# (a shell script starting jose and curl) under software emulation with other VMs on the machine
ATTEMPT_BOUND = 60.0
UNLOCKED = "3f1c7e1a9d8b4e5f8a2b6c4d0e9f1a27"
ATTEMPT_FAILED = "b78d0b12ce2845e28a2231caba460562"


def unit(volume: str) -> str:
    return f"luksvm-unlock@{volume}.service"


def states(text: str) -> dict[str, str]:
    return dict(line.split() for line in text.splitlines())


def unlock_seconds(journal: Journal, volume: str, boot: str) -> float:
    """How long the first start job of the volume's unlock unit in `boot` took."""
    jobs = journal.find(about=unit(volume), JOB_TYPE="start", boot=boot)
    began = next(e for e in jobs if not e.get("JOB_RESULT"))
    ended = next(e for e in jobs if e.get("JOB_RESULT"))
    return (ended.monotonic - began.monotonic) / 1e6


def test_tpm2_and_tang_unlock_unattended_and_fall_back_within_the_bound(host: Machine) -> None:
    host.add_tpm()
    setup = host.boot(scenario("unattended-setup.sh"), timeout=600)
    assert setup.text("tpm-device") == "/dev/tpmrm0"
    dry = setup.text("enroll-dry-run.txt")
    assert "systemd-cryptenroll --unlock-key-file=/proc/self/fd/N --tpm2-device=auto" in dry
    assert "+cr_imap_encr /dev/volgrp4/lvimap_hd0 /etc/luksvm/keys/imap.key " in dry
    assert "luks,discard,x-luksvm.guest=mail,tpm2-device=auto" in dry
    recovery = setup.text("recovery-key")
    assert re.fullmatch(r"[a-z]{8}(-[a-z]{8}){7}", recovery), setup.text("recovery.out")
    assert "shown once, on the terminal" in setup.text("recovery-without-terminal.err")
    assert recovery not in setup.journal.text()  # shown once, never logged
    # key hygiene: doctor names the backups that hold the removed keyfile, prune removes them
    assert setup.text("doctor-stale-rc") == "1"
    assert "still hold a removed key" in setup.text("doctor-stale.txt")
    assert "removed /var/lib/luksvm/header-backups/cr_imap_encr/" in setup.text("prune.txt")
    assert setup.text("doctor-stale-after-rc") == "0"
    assert len(setup.text("backups-left.txt").split()) >= 1
    config = setup.text("config-after.txt")
    assert "cr_imap_encr /dev/volgrp4/lvimap_hd0 - luks,discard,x-luksvm.guest=mail," in config
    assert "tpm2-device=auto" in config and "x-luksvm.tang" in config
    units = setup.text("units.txt")
    assert "After=network-online.target" in units and "TimeoutStartSec=1min 30s" in units
    keys = {k["volume"]: k for k in setup.json("keys-setup.json")}
    assert {c["source"]: c["state"] for c in keys["cr_imap_encr"]["unattended"]} == {"tpm2": "ok"}
    assert {c["source"]: c["state"] for c in keys["cr_web"]["unattended"]} == {
        "tang": "ok",
    }

    boot = host.boot(scenario("unattended-check.sh"), timeout=600)
    assert set(states(boot.text("unit-states")).values()) == {"active"}, boot.text("unit-states")
    assert boot.text("running").split() == ["mail", "web"]
    assert boot.text("ask-files") == ""
    journal, boot_id = boot.journal, boot.boot_id
    assert boot_id
    sources = {
        e.get("LUKSVM_VOLUME"): e.get("LUKSVM_KEY_SOURCE")
        for e in journal.find(boot=boot_id, MESSAGE_ID=UNLOCKED)
    }
    # cr_other's unit runs systemd-cryptsetup itself (a keyfile volume): no luksvm "unlocked"
    # message; its unit is active (above)
    assert sources == {"cr_imap_encr": "tpm2", "cr_web": "tang"}, sources
    status = {v["name"]: v for v in boot.json("status.json")["volumes"]}
    assert status["cr_imap_encr"]["key_source"] == "tpm2"
    assert status["cr_web"]["key_source"] == "tang"
    assert status["cr_other"]["key_source"] == "keyfile"  # from its active unit
    # luksvm.target (DefaultDependencies=no) is not ordered after the units it wants: reached
    # before the guests it pulls in have started, so they never hold back multi-user.target
    # (reached so early that systemd logged it through the kernel log: no JOB_* fields)
    target = journal.first(r"^Reached target luksvm\.target", boot=boot_id)
    for guest in ("mail", "web"):
        assert (
            target.monotonic < journal.job(f"luksvm-guest@{guest}.service", boot=boot_id).monotonic
        )
    timing = {v: round(unlock_seconds(journal, v, boot_id), 2) for v in sources}
    note("unattended unlock at boot, same VM (s): TPM2 / Tang / keyfile", json.dumps(timing))

    host.add_tpm(fresh=True)  # the TPM replaced: nothing sealed to the old one unseals
    fallback = host.boot(
        scenario("unattended-fallback.sh"),
        files={
            "recovery-key": recovery,
            "type_passphrase.py": HERE / "type_passphrase.py",
        },
        timeout=600,
    )
    assert fallback.text("multi-user-state") == "active"
    assert fallback.text("ask-files") == ""
    at_boot = states(fallback.text("unit-states"))
    assert at_boot[unit("cr_imap_encr")] == "failed" and at_boot[unit("cr_web")] == "failed"
    assert at_boot[unit("cr_other")] == "active"
    journal, boot_id = fallback.journal, fallback.boot_id
    assert boot_id
    failed = {
        (e.get("LUKSVM_VOLUME"), e.get("LUKSVM_KEY_SOURCE"))
        for e in journal.find(boot=boot_id, MESSAGE_ID=ATTEMPT_FAILED)
    }
    assert failed == {("cr_imap_encr", "tpm2"), ("cr_web", "tang")}, failed
    for volume in ("cr_imap_encr", "cr_web"):
        took = unlock_seconds(journal, volume, boot_id)
        assert took < ATTEMPT_BOUND + 30, (volume, took)
    note(
        "fallback at boot (s): TPM replaced / Tang down",
        json.dumps(
            {v: round(unlock_seconds(journal, v, boot_id), 2) for v in ("cr_imap_encr", "cr_web")}
        ),
    )
    assert fallback.text("keys-rc") == "2"
    broken = {k["volume"]: k for k in fallback.json("keys-broken.json")}
    assert broken["cr_imap_encr"]["unattended"][0]["state"] == "fail"
    assert broken["cr_web"]["unattended"][0]["state"] == "fail"
    assert fallback.text("doctor-rc") == "2"
    assert "ssh -t HOST luksvm unlock cr_imap_encr" in fallback.text("unlock-without-terminal.err")
    assert fallback.steps["unlock-recovery"].rc == 0
    assert "passphrase" in fallback.text("prompt.txt").lower()
    assert "HITS before=(0, 0) after=(0, 0)" in fallback.text("ps.txt")
    assert fallback.text("imap-unit-after") == "active"  # the unit adopted the mapping
    assert "mail" in fallback.text("running-after").split()
    after = {v["name"]: v for v in fallback.json("status-after.json")["volumes"]}
    assert after["cr_imap_encr"]["key_source"] == "prompt"

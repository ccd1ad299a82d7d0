"""Many hosts on a real host: the Ansible collection luksvm.host (Debian's ansible-core in the VM,
connection local) and luksvm's metrics served by Debian's prometheus-node-exporter, over two boots
of one seed clone.

Boot 1 (scenarios/fleet-setup.sh): the collection is installed from the tarball
`ansible-galaxy collection build` made; the playbook (role luksvm.host.luksvm from variables,
then the modules) sets the seed host up from nothing: settings, both volumes, apply, luksvm.target
and the timers enabled, the wheel "installed" again (unchanged), a volume unlocked and a guest
started through the modules. luksvm.target then runs, so this boot's shutdown stops both guests:
they have no OS, ignore ACPI, and are destroyed by policy after stop_timeout (5 s).
Boot 2 (scenarios/fleet-check.sh): the guests came up by themselves; the second run changes
nothing; node_exporter serves the metrics over loopback HTTP, matching `luksvm status --json` and
showing the guests destroyed at the last shutdown. Check mode with a changed variable is
tests/integration/test_ansible.py's (the same role; here each task costs seconds, and the check
run took 50-125 s of this test).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from luksvm import __version__

from .vm import Machine, note, scenario

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
COLLECTION = REPO / "ansible/ansible_collections/luksvm/host"
STOP_TIMEOUT = 5.0

PLAYBOOK = """\
- hosts: localhost
  gather_facts: false
  roles:
    - role: luksvm.host.luksvm
  tasks:
    - name: Back up the headers
      luksvm.host.header_backup:
      register: headers
    - name: Unlock the mail server's volume
      luksvm.host.volume:
        name: cr_imap_encr
        state: unlocked
    - name: Start the mail server
      luksvm.host.guest:
        name: mail
    - name: Read luksvm's facts
      luksvm.host.info:
        doctor: false
    - name: Say what the facts hold
      ansible.builtin.debug:
        msg: "volumes={{ ansible_facts.luksvm.status.volumes | map(attribute='name') | join(',') }}"
"""

VARIABLES = {
    # the image has luksvm's Debian dependencies; apt's cache costs half a minute a run under TCG
    "luksvm_wheel_dependencies": [],
    "luksvm_settings": {"guests": {"stop_timeout": "5s"}},
    "luksvm_volumes": [
        {
            "name": "cr_imap_encr",
            "source": "/dev/volgrp4/lvimap_hd0",
            "key": "/etc/luksvm/keys/imap.key",
            "options": ["luks", "discard"],
            "guests": ["mail"],
        },
        {
            "name": "cr_web",
            "source": "/dev/volgrp4/lvweb_hd0",
            "key": "/etc/luksvm/keys/web.key",
            "options": ["luks", "discard"],
            "guests": ["web"],
        },
    ],
}


def recap(text: str) -> dict[str, int]:
    match = re.search(r"localhost\s+:\s+(.*)", text)
    assert match, text
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_playbook_sets_up_reboot_brings_guests_up_rerun_is_idempotent_and_metrics_match(
    host: Machine, luksvm_wheel: Path, tmp_path: Path
) -> None:
    built = subprocess.run(
        ["ansible-galaxy", "collection", "build", str(COLLECTION), "--output-path", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    tarball = tmp_path / f"luksvm-host-{__version__}.tar.gz"
    files = {
        tarball.name: tarball,
        luksvm_wheel.name: luksvm_wheel,
        "site.yml": PLAYBOOK,
        "vars.json": json.dumps(VARIABLES),
    }

    setup = host.boot(scenario("fleet-setup.sh"), files=files, timeout=900)

    first = recap(setup.text("first-run.txt"))
    assert first["failed"] == 0 and first["changed"] >= 6, setup.text("first-run.txt")
    assert setup.text("enabled.txt").split() == ["enabled", "enabled"]
    assert "volumes=cr_imap_encr,cr_web" in setup.text("first-run.txt")
    status = setup.json("status-1.json")
    assert {v["name"]: v["state"] for v in status["volumes"]} == {
        "cr_imap_encr": "unlocked",
        "cr_web": "unlocked",
    }
    assert {g["name"]: g["state"] for g in status["guests"]} == {
        "mail": "running",
        "web": "running",
    }
    note("ansible first run (TCG VM)", f"{setup.steps['first-run'].ms / 1000:.1f} s")

    check = host.boot(scenario("fleet-check.sh"), files=files, timeout=900)

    booted = check.json("status-boot.json")
    assert {g["name"]: g["state"] for g in booted["guests"]} == {
        "mail": "running",
        "web": "running",
    }
    second = recap(check.text("second-run.txt"))
    assert (second["changed"], second["failed"]) == (0, 0), check.text("second-run.txt")
    note("ansible second run (TCG VM)", f"{check.steps['second-run'].ms / 1000:.1f} s")

    scraped = check.text("scrape.txt")
    got = samples(scraped)
    status = check.json("status.json")
    for volume in status["volumes"]:
        key = f'luksvm_volume_unlocked{{volume="{volume["name"]}"}}'
        assert got[key] == (volume["state"] == "unlocked"), key
        key = f'luksvm_volume_device_present{{volume="{volume["name"]}"}}'
        assert got[key] == volume["device_present"], key
    for guest in status["guests"]:
        assert got[f'luksvm_guest_running{{guest="{guest["name"]}"}}'] == (
            guest["state"] == "running"
        )
        assert got[f'luksvm_guest_may_start{{guest="{guest["name"]}"}}'] == guest["may_start"]
    assert got["luksvm_libvirt_up"] == 1
    for guest in ("mail", "web"):
        assert got[f'luksvm_last_shutdown_guest_action{{action="destroyed",guest="{guest}"}}'] == 1
        assert got[f'luksvm_last_shutdown_guest_action{{action="shutdown",guest="{guest}"}}'] == 0
        stopped = got[f'luksvm_last_shutdown_guest_stop_seconds{{guest="{guest}"}}']
        assert STOP_TIMEOUT <= stopped < STOP_TIMEOUT + 30, stopped
    assert got['luksvm_source_up{source="journal"}'] == 1
    assert got['luksvm_source_up{source="doctor"}'] == 1
    assert (
        'node_textfile_mtime_seconds{file="/var/lib/prometheus/node-exporter/luksvm.prom"}'
        in (scraped)
        or 'node_textfile_mtime_seconds{file="luksvm.prom"}' in scraped
    )
    assert got.get("node_textfile_scrape_error") == 0
    note(
        "luksvm metrics via node_exporter",
        str(sum(k.startswith("luksvm_") for k in got)) + " series",
    )

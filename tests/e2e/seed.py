"""The seed host: built once per test session, cloned (copy-on-write) for every scenario.

One boot of a fresh machine runs scenarios/seed.sh: it installs the luksvm wheel and lays out
storage and guests the way a luksvm user's host has them before luksvm is configured:

    disk pv0 → VG volgrp4 → LV lvimap_hd0 → LUKS2 (key /etc/luksvm/keys/imap.key) → cr_imap_encr
                                → guest VG vgmail, LV root (ext4), PV on the whole disk: it leaks
                          → LV lvweb_hd0  → LUKS2 (key /etc/luksvm/keys/web.key)  → cr_web
                                → a partition table (a guest that does not leak)
    libvirt domains mail (disk /dev/mapper/cr_imap_encr) and web (/dev/mapper/cr_web): type qemu,
    64 MiB, no OS. Everything closed; no /etc/crypttab; no luksvm configuration.

The seed's disks are then frozen; `clone()` gives a Machine with qcow2 overlays over all of them.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from .image import Image
from .vm import BootResult, Machine, note, scenario

VG = "volgrp4"
VOLUMES = {"cr_imap_encr": "lvimap_hd0", "cr_web": "lvweb_hd0"}
GUESTS = {"mail": "cr_imap_encr", "web": "cr_web"}
GUEST_VG = "vgmail"  # inside cr_imap_encr
PV_DISK = "pv0"
PV_DISK_SIZE = 2 * 1024**3  # sparse; LVs use 384 MiB of it, the rest is free extents for scenarios
SEED_TIMEOUT = 1200.0


class SeedHost:
    def __init__(self, machine: Machine, info: dict[str, Any], seconds: float):
        self.machine = machine
        self.info = info  # seed.json: LUKS UUIDs, key paths, domains, luksvm version
        self.seconds = seconds
        self._numbers = itertools.count(1)

    @classmethod
    def build(cls, image: Image, wheel: Path, workdir: Path) -> SeedHost:
        started = time.monotonic()

        def seed_boot(folder: Path) -> tuple[Machine, BootResult]:
            machine = Machine.fresh(image, folder, name="seed", data_disks={PV_DISK: PV_DISK_SIZE})
            files = {wheel.name: wheel}
            return machine, machine.boot(
                scenario("seed.sh"), files=files, timeout=SEED_TIMEOUT, check=False
            )

        machine, result = seed_boot(workdir)
        if result.boot_again:
            # Once, a fresh seed: every test stands on it, and a hung vCPU, a panic or a frozen
            # VM under emulation is not luksvm's doing. The boot's console and journal stay in
            # `workdir`.
            note(f"seed boot {result.broke}, built again", f"{result.problem} ({result.dir})")
            machine.discard()
            machine, result = seed_boot(workdir.with_name(workdir.name + "-again"))
        machine.check(result)
        info = result.json("seed.json")
        missing = sorted(set(GUESTS) - set(info["domains"]))
        if missing:
            raise AssertionError(f"seed host lacks libvirt domains {missing}\n{result.describe()}")
        machine.freeze()
        return cls(machine, info, round(time.monotonic() - started, 1))

    def clone(self, workdir: Path | None = None, name: str | None = None) -> Machine:
        """An independent copy of the seed host (overlays over its root and data disks).

        Prefer the `host` fixture, which also deletes the copy's disks after the test."""
        number = next(self._numbers)
        workdir = workdir or self.machine.workdir.parent / f"clone-{number}"
        return self.machine.clone(workdir, name or f"host-{number}")

"""luksvm shrink, then grow, in the VM, with data, on both stacks in one machine
(scenarios/shrink.sh, then shrink-check.sh after a reboot); in the same boot a running guest's disk
grows (luksvm grow GUEST).

The layouts are built to round numbers, so every figure of the plan is written out by hand below
from the layout alone and compared with what luksvm planned and with what the devices say after the
reboot. Only the filesystem minimum comes from the VM (resize2fs -P, read by the script itself).
"""

from __future__ import annotations

import math
import re

import pytest

from luksvm import journal

from .vm import BootResult, Machine, note, scenario

pytestmark = pytest.mark.e2e

MiB = 1024**2
EXTENT = 4 * MiB  # LVM's default, in the host VG and in both guest VGs

# Stack A: host LV volgrp4/lvimap_hd0 (640 MiB) → LUKS2 (data offset 16 MiB) → vgmail:
#   root PE 0-79 (320 MiB), a hole PE 80-95, data PE 96-111 (64 MiB); shrink root to 128 MiB.
A_OFFSET = 16 * MiB
A = {
    "lv_size": 128 * MiB,
    "lv_extents": 32,
    "fs_blocks": 128 * 1024,  # 1 KiB blocks (mke2fs's "small" type below 512 MiB)
    "allocated_extents": 32 + 16,  # root after the cut + data
    "pv_min_size": 1 * MiB + 48 * EXTENT,  # pe_start + extents; one metadata area, at the start
    "crypt_min_sectors": (1 * MiB + 48 * EXTENT) // 512,
    "container_min_size": A_OFFSET + 1 * MiB + 48 * EXTENT,  # 209 MiB
    "container_size": 212 * MiB,  # rounded up to whole host extents: 53
    "partition_end": -1,
    "crypt_final_sectors": (212 - 16) * MiB // 512,  # the mapping fills the host LV again
    "pv_final_extents": (196 - 1) * MiB // EXTENT,  # 48: 3 MiB stay unused at the PV's end
    "freed": (640 - 212) * MiB,
}
A_MOVES = [{"lv": "data", "le_start": 0, "source_pe": 96, "target_pe": 32, "extents": 16}]

# Stack B: partition 1 of disk pv1 (sectors 2048-919551, 448 MiB) → LUKS1, payload offset 4,104
#   sectors → vgdata: home PE 0-63 (256 MiB), a hole PE 64-71, srv PE 72-79; shrink home to 128 MiB.
B_OFFSET = 4104 * 512
B_PART_START = 2048
B_PV_MIN = 1 * MiB + 40 * EXTENT  # 161 MiB
B_CONTAINER_MIN = B_OFFSET + B_PV_MIN  # 333,832 sectors
# the partition's end, aligned to 1 MiB (2048 sectors): round_up(2048 + 333,832, 2048) - 1
B_PART_END = math.ceil((B_PART_START + B_CONTAINER_MIN // 512) / 2048) * 2048 - 1  # 337,919
B_PART_SECTORS = B_PART_END - B_PART_START + 1  # 335,872 = 164 MiB
B = {
    "lv_size": 128 * MiB,
    "lv_extents": 32,
    "fs_blocks": 128 * 1024,
    "allocated_extents": 32 + 8,
    "pv_min_size": B_PV_MIN,
    "crypt_min_sectors": B_PV_MIN // 512,
    "container_min_size": B_CONTAINER_MIN,
    "container_size": B_PART_SECTORS * 512,
    "partition_end": B_PART_END,
    "crypt_final_sectors": B_PART_SECTORS - 4104,  # 331,768
    "pv_final_extents": (B_PART_SECTORS * 512 - B_OFFSET - 1 * MiB) // EXTENT,  # 40
    "freed": (917504 - B_PART_SECTORS) * 512,  # 284 MiB
}
B_MOVES = [{"lv": "srv", "le_start": 0, "source_pe": 72, "target_pe": 32, "extents": 8}]

# Grown back: root to 320 MiB (80 extents). vgmail has no free extent (root 32 + data 16 = all
# 48), so the PV needs 48 more: 1 MiB + 96 × 4 MiB = 385 MiB; + 16 MiB data offset = 401 MiB,
# whole host extents: 404 MiB. The mapping fills it (388 MiB); the PV fills that: 96 extents.
GA = {"host_lv": 404 * MiB, "crypt_sectors": 388 * MiB // 512, "pv_extents": 96,
      "lv": 320 * MiB, "fs_blocks": 320 * 1024}  # fmt: skip
# home to 256 MiB (64 extents): vgdata needs 32 more; PV 1 MiB + 72 × 4 MiB = 289 MiB = 591,872
# sectors; + 4,104 = 595,976 from sector 2,048 → end 598,023, aligned to 2,048: 600,063.
GB_END = 600_063
GB_SECTORS = GB_END - B_PART_START + 1  # 598,016 = 292 MiB
GB = {"crypt_sectors": GB_SECTORS - 4104, "pv_extents": 72, "lv": 256 * MiB,
      "fs_blocks": 256 * 1024}  # fmt: skip
# The guest web's disk: LUKS2 (16 MiB data offset) on host LV lvweb_hd0 (128 MiB): 112 MiB, grown
# by 64 MiB (host LV 192 MiB), then to 208 MiB (host LV 224 MiB = 56 extents).
G_OLD = 112 * MiB
G_FINAL = 208 * MiB


def test_shrink_both_stacks_with_data(host: Machine) -> None:
    host.add_disk("pv1", 512 * MiB)
    work = host.boot(scenario("shrink.sh"), timeout=900)
    check_figures(work)
    check_refusals(work)
    check_runs(work)
    check_grown_back(work)
    check_online_guest(work)

    manifests = {f"{n}.sha256": work.path(f"{n}.sha256") for n in ("a-root", "a-data", "b-home",
                                                                  "b-srv")}  # fmt: skip
    after = host.boot(scenario("shrink-check.sh"), files=manifests, timeout=600)
    check_after_reboot(after)

    note(
        "shrink: boots (work, check)",
        f"{work.seconds:.0f} s, {after.seconds:.0f} s; run A {work.steps['a-run'].ms} ms, "
        f"resumed run B {work.steps['b-run-resume'].ms} ms",
    )
    note(
        "grow: guest web online (host LV, mapping, QEMU), grow --lv A (closed), B (mounted)",
        f"{work.steps['g-grow'].ms} ms, {work.steps['a-grow'].ms} ms, {work.steps['b-grow'].ms} ms",
    )


def check_figures(work: BootResult) -> None:
    # the layouts are what the figures above assume
    luks2 = work.text("a-luksdump.txt")
    assert re.search(rf"offset:\s+{A_OFFSET} \[bytes\]", luks2), luks2
    assert re.search(r"sector:\s+512 \[bytes\]", luks2), luks2
    assert re.search(r"Payload offset:\s+4104$", work.text("b-luksdump.txt"), re.MULTILINE)

    for name, plan, figures, moves in (("A", "a-plan.json", A, A_MOVES),
                                       ("B", "b-plan.json", B, B_MOVES)):  # fmt: skip
        planned = work.json(plan)
        targets = planned["targets"]
        fs = filesystem_facts(work, "a-root" if name == "A" else "b-home")
        assert targets["fs_required_blocks"] == fs["required"], (name, targets, fs)
        assert {k: targets[k] for k in figures} == figures, f"stack {name}: {targets}"
        assert planned["moves"] == moves, f"stack {name}"
        assert not planned["nothing_to_do"]

    # the text plan prints the same numbers, in the units the tools read
    text = work.text("a-plan.txt")
    assert f"-L {A['lv_size']}b vgmail/root" in text
    assert f"--size {A['crypt_min_sectors']} cr_imap_encr" in text
    assert f"--size {A['crypt_final_sectors']} cr_imap_encr" in text
    assert f"-L {A['container_size']}b volgrp4/lvimap_hd0" in text
    assert "pvmove --devices /dev/mapper/cr_imap_encr --alloc anywhere -n data" in text
    assert "/dev/mapper/cr_imap_encr:96-111 /dev/mapper/cr_imap_encr:32-47" in text
    text = work.text("b-plan.txt")
    assert f"echo 2048,{B_PART_SECTORS} | sfdisk" in text
    assert f"end {B_PART_END}" in text
    assert f"--size {B['crypt_final_sectors']} cr_data" in text
    assert "cryptsetup resize --key-file" not in text  # LUKS1 resize needs no key


def filesystem_facts(work: BootResult, name: str) -> dict[str, int]:
    """resize2fs -P's minimum and the used blocks, as the script read them before planning."""
    header = work.text(f"{name}.dumpe2fs")

    def field(label: str, text: str) -> int:
        match = re.search(rf"^{label}:\s*(\d+)", text, re.MULTILINE)
        assert match, f"{label} not in {name}'s output"
        return int(match.group(1))

    used = field("Block count", header) - field("Free blocks", header)
    minimum = field("Estimated minimum size of the filesystem", work.text(f"{name}.resize2fs-P"))
    return {
        "used": used,
        "minimum": minimum,
        "block_size": field("Block size", header),
        "required": minimum + math.ceil(used * 25 / 100),
    }


def check_refusals(work: BootResult) -> None:
    assert work.steps["below-minimum"].rc == 2
    fs = filesystem_facts(work, "b-home")
    smallest = math.ceil(fs["required"] * fs["block_size"] / EXTENT)
    err = work.text("below-minimum.err")
    assert f"needs {fs['required']:,} blocks of {fs['block_size']:,} B" in err, err
    assert f"--to {smallest}e ({smallest * EXTENT:,} B)" in err, err
    assert "Traceback" not in err
    assert work.steps["bare-size"].rc == 64
    assert "GiB" in work.text("bare-size.err")


def check_runs(work: BootResult) -> None:
    # stack A: luksvm opened the closed container with its configured key, then closed it again
    assert "every check held" in work.text("a-run.txt")
    assert "cr_imap_encr" not in work.text("a-crypt-after.txt")

    # stack B: killed as the pvmove began; the LV was cut already, the move not done
    assert work.text("b-killed-rc") == "137", work.text("b-run-killed.txt")
    killed = work.text("b-run-killed.txt")
    assert f"ok: lvs: vgdata/home is {B['lv_size']:,} B" in killed
    sizes = {lv["lv_name"]: int(lv["lv_size"]) for lv in lv_rows(work.json("b-lvs-killed.json"))}
    assert sizes == {"home": B["lv_size"], "srv": 32 * MiB}
    # planned again from that state: the same targets, the filesystem and LV steps gone
    resumed = work.json("b-plan-resume.json")
    assert {k: resumed["targets"][k] for k in B} == B
    commands = [step["argv"][0] for step in resumed["steps"]]
    assert "resize2fs" not in commands and "lvreduce" not in commands, commands
    assert commands.count("pvmove") == 1
    assert "every check held" in work.text("b-run-resume.txt")
    assert "Nothing to do" in work.text("b-run-again.txt")
    # what the admin had open and active is still so
    assert "cr_data" in work.text("b-crypt-after.txt")
    assert {lv["lv_name"]: lv["lv_active"] for lv in lv_rows(work.json("b-lvs-after.json"))} == {
        "home": "active",
        "srv": "active",
    }


def lv_rows(report: dict) -> list[dict]:  # type: ignore[type-arg]
    return report["report"][0]["lv"]  # type: ignore[no-any-return]


def check_grown_back(work: BootResult) -> None:
    a = work.json("a-grow-plan.json")
    assert a["target"] == GA["lv"] and a["today"] == A["lv_size"], a
    assert [s["argv"][0] for s in a["steps"]] == [
        "vgcfgbackup", "vgcfgbackup", "lvextend", "cryptsetup", "pvresize", "lvextend",
        "e2fsck", "resize2fs",
    ]  # fmt: skip
    argv = [s["argv"] for s in a["steps"]]
    assert argv[2] == [
        "lvextend",
        "--yes",
        "-l",
        str(GA["host_lv"] // EXTENT),
        "volgrp4/lvimap_hd0",
    ]
    assert argv[3][-3:] == ["--size", str(GA["crypt_sectors"]), "cr_imap_encr"], argv[3]
    assert "--key-file=-" in argv[3]  # LUKS2: the key on stdin
    assert argv[5][-2:] == ["80", "vgmail/root"]
    assert "every check held" in work.text("a-grow.txt")
    assert "cr_imap_encr" not in work.text("a-crypt-after-grow.txt")  # closed again

    b = work.json("b-grow-plan.json")
    commands = [s["argv"][0] for s in b["steps"]]
    assert commands == [
        "vgcfgbackup",
        "sfdisk",
        "partx",
        "cryptsetup",
        "pvresize",
        "lvextend",
        "resize2fs",
    ], commands  # fmt: skip  (mounted: no e2fsck)
    sfdisk = b["steps"][1]
    assert sfdisk["stdin"] == f"{B_PART_START},{GB_SECTORS}\n"
    assert b["steps"][2]["check"]["expected"] == GB_SECTORS * 512
    assert b["steps"][3]["argv"][-3:] == ["--size", str(GB["crypt_sectors"]), "cr_data"]
    assert "--key-file=-" not in b["steps"][3]["argv"]  # LUKS1 resize needs no key
    assert "every check held" in work.text("b-grow.txt")
    assert work.text("b-mounted-after-grow").strip() in {"/dev/mapper/vgdata-home",
                                                         "/dev/vgdata/home"}  # fmt: skip


def check_online_guest(work: BootResult) -> None:
    assert int(work.text("g-old-bytes")) == G_OLD
    # refusals: exact messages, nothing changed
    assert work.steps["g-bare-size"].rc == 64
    assert "ambiguous" in work.text("g-bare-size.err")
    assert work.steps["g-not-larger"].rc == 2
    assert "is not larger" in work.text("g-not-larger.err")
    assert "luksvm shrink" in work.text("g-not-larger.err")
    assert work.steps["g-no-room"].rc == 2
    no_room = work.text("g-no-room.err")
    assert re.search(r"VG volgrp4 has [\d,]+ free extents; .* needs 25,600 \(", no_room), no_room
    assert work.steps["g-inside"].rc == 2
    assert "guest agent" in work.text("g-inside.err")
    for err in ("g-bare-size", "g-not-larger", "g-no-room", "g-inside"):
        assert "Traceback" not in work.text(f"{err}.err")
    assert work.text("g-lv-after-refusals") == work.text("g-lv-before") == str(128 * MiB)
    assert int(work.text("g-mapping-after-refusals")) == G_OLD

    plan = work.json("g-plan.json")
    steps = plan["steps"]
    assert [s["argv"][:2] for s in steps] == [
        ["vgcfgbackup", "-f"], ["lvextend", "--yes"], ["cryptsetup", "resize"],
        ["virsh", "-c"],
    ]  # fmt: skip
    assert steps[1]["argv"][-2:] == ["48", "volgrp4/lvweb_hd0"]  # 192 MiB host LV
    assert steps[2]["argv"][-3:] == ["--size", str((G_OLD + 64 * MiB) // 512), "cr_web"]
    assert steps[3]["libvirt"] == {"guest": "web", "disk": "vda", "bytes": G_OLD + 64 * MiB}
    assert plan["inside"]["source"] == "none"  # no agent in the nested guest: nothing guessed
    assert "growpart" in "".join(plan["inside"]["notes"])

    # killed after lvextend, before cryptsetup resize; the same command resumed
    assert work.text("g-killed-rc") == "137", work.text("g-killed.txt")
    assert work.text("g-lv-killed") == str(192 * MiB)
    resumed = work.text("g-resume.txt")
    assert "already done (lvs: volgrp4/lvweb_hd0 is 201,326,592 B)" in resumed, resumed
    assert "every check held" in resumed

    # QEMU sees exactly the mapping's size; LV and mapping exactly as planned; same QEMU
    assert int(work.text("g-capacity")) == G_FINAL
    assert int(work.text("g-mapping-bytes")) == G_FINAL
    assert int(work.text("g-lv-bytes")) == G_FINAL + 16 * MiB
    assert work.text("g-pid-after") == work.text("g-pid-before")
    assert work.text("g-state-after") == "running"
    assert work.text("g-after.sha256") == work.text("g-before.sha256")
    grown = work.entries(
        r"^grew guest web, disk vda \(cr_web\) from ",
        LUKSVM_VOLUME="cr_web",
        MESSAGE_ID=journal.MESSAGE_IDS["volume-grown"],
    )
    assert len(grown) == 2, grown  # the resumed run and the second grow


def check_after_reboot(after: BootResult) -> None:
    failed = {name: step.rc for name, step in after.steps.items() if step.rc != 0}
    assert not failed, f"checks failed after the reboot: {failed}\n{after.output[-3000:]}"
    for name in ("a-root", "a-data", "b-home", "b-srv"):
        assert f"sha256-{name}" in after.steps and f"fsck-{name}" in after.steps

    host_lvs = {lv["lv_name"]: int(lv["lv_size"]) for lv in lv_rows(after.json("host-lvs.json"))}
    assert host_lvs["lvimap_hd0"] == GA["host_lv"]  # shrunk, then grown back

    partition = after.json("b-sfdisk.json")["partitiontable"]["partitions"][0]
    assert (partition["start"], partition["size"]) == (B_PART_START, GB_SECTORS)
    assert int(after.text("b-part-kernel-sectors")) == GB_SECTORS

    for status, figures in (("a-status.txt", GA), ("b-status.txt", GB)):
        assert f"size:    {figures['crypt_sectors']} sectors" in after.text(status)

    pvs = {pv["vg_name"]: pv for pv in after.json("pvs.json")["report"][0]["pv"]}
    for vg, figures in (("vgmail", GA), ("vgdata", GB)):
        assert int(pvs[vg]["pv_pe_count"]) == figures["pv_extents"], pvs[vg]
        assert int(pvs[vg]["dev_size"]) == figures["crypt_sectors"] * 512, pvs[vg]

    lvs = {(lv["vg_name"], lv["lv_name"]): lv for lv in lv_rows(after.json("guest-lvs.json"))}
    expected = {
        ("vgmail", "root"): GA["lv"],
        ("vgmail", "data"): 64 * MiB,
        ("vgdata", "home"): GB["lv"],
        ("vgdata", "srv"): 32 * MiB,
    }
    assert {key: int(lv["lv_size"]) for key, lv in lvs.items()} == expected
    # the moved LVs in one piece; the grown ones continue behind them
    assert {key: lv["seg_count"] for key, lv in lvs.items()} == {
        ("vgmail", "root"): "2",
        ("vgmail", "data"): "1",
        ("vgdata", "home"): "2",
        ("vgdata", "srv"): "1",
    }, lvs

    # the filesystems fill their LVs exactly
    for name, blocks in (("a-root", GA["fs_blocks"]), ("b-home", GB["fs_blocks"])):
        assert f"Block count:              {blocks}" in after.text(f"{name}.fs.txt")

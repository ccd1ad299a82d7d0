"""The grow planners on layouts worked out by hand, the guards, and the inside steps from agent
replies (tests/unit/data/agent)."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from luksvm import cli, grow, virt
from luksvm.blockdev import Partition
from luksvm.cryptsetup import LuksHeader
from luksvm.errors import LuksvmError, UsageError
from luksvm.stack import HostLv
from tests.unit.test_shrink import seed_layout

MiB = 1024**2
GiB = 1024**3
EXT = 4 * MiB
AGENT = Path(__file__).parent / "data" / "agent"

LUKS2 = LuksHeader(
    device="/dev/volgrp4/lvimap_hd0",
    version=2,
    uuid="0b9e0b84-5a43-4a4e-9cbb-8d2a2c1b6a11",
    label="",
    cipher="aes-xts-plain64",
    data_offset=16 * MiB,
    sector_size=512,
    keyslots=(),
    flags=(),
    tokens=(),
)


def guest_disk(**changes: Any) -> grow.GuestDisk:
    """Guest mail on cr_imap_encr: host LV 256 MiB (64 extents), LUKS2 16 MiB offset, so the
    guest sees 240 MiB; running, mapping open; 100 extents free in volgrp4."""
    disk = grow.GuestDisk(
        guest="mail",
        target="vda",
        volume="cr_imap_encr",
        host=HostLv("/dev/volgrp4/lvimap_hd0", "volgrp4", "lvimap_hd0", 256 * MiB, EXT),
        luks=LUKS2,
        mapping_size=240 * MiB,
        running=True,
        capacity=240 * MiB,
        host_free_extents=100,
    )
    return dataclasses.replace(disk, **changes)


def by(text: str) -> grow.Amount:
    return grow.parse_amount(text, None)


def to(text: str) -> grow.Amount:
    return grow.parse_amount(None, text)


# --- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("by_", "to_", "message"),
    [
        ("60G", None, "ambiguous"),
        (None, "100", "has no unit"),
        (None, None, "exactly one of --by SIZE and --to SIZE"),
        ("1GiB", "2GiB", "exactly one"),
        ("0B", None, "above zero"),
    ],
)
def test_sizes_are_checked_before_anything_is_read(
    by_: str | None, to_: str | None, message: str
) -> None:
    with pytest.raises(UsageError, match=message) as error:
        grow.parse_amount(by_, to_)
    assert error.value.exit_code == 64


def test_cli_usage_errors_exit_64_without_reading_the_host(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_reading(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the host was read before the arguments were checked")

    monkeypatch.setattr(grow, "grow_guest", no_reading)
    monkeypatch.setattr(grow, "grow_lv", no_reading)
    monkeypatch.setattr(grow.config, "load", no_reading)
    for argv, message in (
        (["grow", "mail", "--to", "60G"], "ambiguous"),
        (["grow", "mail"], "exactly one of --by"),
        (["grow", "--by", "1GiB"], "a GUEST or --lv"),
        (["grow", "mail", "--lv", "vg/lv", "--by", "1GiB"], "a GUEST or --lv"),
        (["grow", "--lv", "vg/lv", "--disk", "vda", "--by", "1GiB"], "--disk and --inside"),
        (["grow", "--lv", "novg", "--by", "1GiB"], "expected VG/LV"),
        (["grow", "mail", "--device", "/dev/sda2", "--by", "1GiB"], "--device belongs"),
    ):
        assert cli.main(argv) == 64, argv
        assert message in capsys.readouterr().err, argv


# --- grow GUEST -----------------------------------------------------------------------------------


def test_running_guest_plan_in_exact_units() -> None:
    # By hand: 240 MiB + 64 MiB = 304 MiB = 318,767,104 B = 622,592 sectors; host LV = 16 MiB
    # offset + 304 MiB = 320 MiB = 80 extents (16 more; 100 free).
    plan = grow.plan_guest(guest_disk(), by("64MiB"), backup_dir="/b")
    assert (plan.today, plan.target) == (240 * MiB, 304 * MiB)
    assert [s.argv for s in plan.steps] == [
        ("vgcfgbackup", "-f", "/b/volgrp4.vg", "volgrp4"),
        ("lvextend", "--yes", "-l", "80", "volgrp4/lvimap_hd0"),
        ("cryptsetup", "resize", "--key-file=-", "--size", "622592", "cr_imap_encr"),
        ("virsh", "-c", "qemu:///system", "blockresize", "mail", "vda", "318767104B"),
    ]
    checks = [(s.check.kind, s.check.expected) for s in plan.steps]
    assert checks == [
        ("file", 0),
        ("lv_size", 320 * MiB),
        ("mapping_size", 622_592),
        ("block_capacity", 318_767_104),
    ]
    resize = plan.steps[3]
    assert resize.action == "libvirt-block-resize"
    assert resize.call == ("mail", "vda", 318_767_104)
    assert plan.steps[2].needs_key and not plan.steps[1].needs_key
    data = grow.describe(plan)
    assert data["steps"][3]["libvirt"] == {  # type: ignore[index]
        "guest": "mail",
        "disk": "vda",
        "bytes": 318_767_104,
    }
    json.dumps(data)
    assert "VIR_DOMAIN_BLOCK_RESIZE_BYTES" in grow.format_plan(plan)


def test_to_is_the_size_the_guest_sees_and_luks1_resize_needs_no_key() -> None:
    luks1 = dataclasses.replace(LUKS2, version=1, data_offset=4096 * 512)
    # 256 MiB LV - 2 MiB payload offset = 254 MiB today; --to 318 MiB → LV 320 MiB
    disk = guest_disk(luks=luks1, mapping_size=254 * MiB, capacity=254 * MiB)
    plan = grow.plan_guest(disk, to("318MiB"), backup_dir="/b")
    resize = plan.steps[2]
    assert resize.argv == ("cryptsetup", "resize", "--size", str(318 * MiB // 512), "cr_imap_encr")
    assert not resize.needs_key


def test_shut_off_guest_closed_volume_only_lvextend() -> None:
    disk = guest_disk(mapping_size=None, running=False, capacity=None)
    plan = grow.plan_guest(disk, by("64MiB"), backup_dir="/b")
    assert [s.argv[0] for s in plan.steps] == ["vgcfgbackup", "lvextend"]
    assert any("closed" in note for note in plan.notes)


def test_shut_off_guest_open_volume_also_resizes_the_mapping() -> None:
    disk = guest_disk(running=False, capacity=None)
    plan = grow.plan_guest(disk, by("64MiB"), backup_dir="/b")
    assert [s.argv[0] for s in plan.steps] == ["vgcfgbackup", "lvextend", "cryptsetup"]


def test_a_rerun_after_lvextend_plans_the_same_target() -> None:
    """--by counts from what the guest sees, so a run killed after lvextend (LV grown, mapping
    and QEMU not) is resumed by the same command, not grown twice."""
    first = grow.plan_guest(guest_disk(), by("64MiB"), backup_dir="/b")
    grown_lv = dataclasses.replace(guest_disk().host, size=320 * MiB)
    again = grow.plan_guest(guest_disk(host=grown_lv), by("64MiB"), backup_dir="/b")
    assert again.target == first.target
    assert [s.argv for s in again.steps] == [s.argv for s in first.steps]


def test_not_larger_points_to_shrink() -> None:
    with pytest.raises(grow.GrowRefused, match=r"is not larger.*luksvm shrink") as error:
        grow.plan_guest(guest_disk(), to("240MiB"), backup_dir="/b")
    assert error.value.exit_code == 2
    assert error.value.fix == "to make it smaller, shut the guest off and use luksvm shrink"


def test_too_few_free_extents_says_needed_and_free() -> None:
    with pytest.raises(grow.GrowRefused) as error:
        grow.plan_guest(guest_disk(host_free_extents=10), by("64MiB"), backup_dir="/b")
    message = str(error.value)
    assert "VG volgrp4 has 10 free extents" in message
    assert "needs 16 (16 extents × 4,194,304 B" in message
    assert error.value.fix == "add a PV to volgrp4 (vgextend) or grow by less"


def test_a_size_that_is_not_whole_extents_is_a_usage_error_with_both_neighbours() -> None:
    with pytest.raises(UsageError) as error:
        grow.plan_guest(guest_disk(), by("1MiB"), backup_dir="/b")
    message = str(error.value)
    assert "not a whole number of the 4,194,304 B (4 MiB) extents" in message
    assert f"--to {240 * MiB}B" in message and f"--to {244 * MiB}B" in message


def test_by_in_extents_uses_the_host_vg_extent_size() -> None:
    plan = grow.plan_guest(guest_disk(), by("4e"), backup_dir="/b")
    assert plan.target == 240 * MiB + 4 * EXT


# --- grow --lv ------------------------------------------------------------------------------------


def seed(room_sectors: int, mounted: tuple[str, ...] = ()) -> grow.LvLayout:
    layout = dataclasses.replace(seed_layout(), mounted=mounted)
    part = layout.container
    assert isinstance(part, Partition)
    return grow.LvLayout(layout, grow.Room(part.end + room_sectors, "sda3 starts there"))


def test_lv_grows_into_free_extents_without_touching_lower_layers() -> None:
    # The seed's VG: 26,615 extents, lvroot 20,480 + lvswap 512 allocated: 5,623 free.
    plan = grow.plan_lv(seed(0), by("10GiB"), backup_dir="/b")
    assert [s.argv[0] for s in plan.steps] == ["vgcfgbackup", "lvextend", "e2fsck", "resize2fs"]
    assert plan.steps[1].argv[-2:] == ("23040", "vgseed/lvroot")
    assert plan.steps[3].check.expected == 23_040 * EXT // 4096


def test_lv_grows_the_partition_by_what_the_vg_lacks() -> None:
    # By hand: 40 GiB more = 10,240 extents; 5,623 free, so the PV needs 4,617 more: 31,232
    # extents. PV = 1 MiB + 31,232 × 4 MiB = 130,997,551,104 B = 255,854,592 sectors (LUKS1: 512 B
    # sectors); + 65,537 sectors of header = 255,920,129 sectors from 2,099,200: end 258,019,328,
    # aligned to 2,048 sectors: 258,021,375, so 255,922,176 sectors. The mapping then fills the
    # partition: 255,856,639 sectors; the PV (255,856,639 × 512 - 1 MiB) // 4 MiB = 31,232.
    mounted = ("/",)
    plan = grow.plan_lv(seed(40 * GiB // 512, mounted), by("40GiB"), backup_dir="/b")
    assert [s.argv[0] for s in plan.steps] == [
        "vgcfgbackup",
        "sfdisk",
        "partx",
        "cryptsetup",
        "pvresize",
        "lvextend",
        "resize2fs",
    ]  # fmt: skip  (mounted: online, no e2fsck)
    sfdisk = plan.steps[1]
    assert sfdisk.stdin == "2099200,255922176\n"
    assert sfdisk.argv[:3] == ("sfdisk", "--no-reread", "--no-tell-kernel")
    assert plan.steps[2].argv == ("partx", "--update", "--nr", "2", "/dev/sda")
    assert plan.steps[3].argv == ("cryptsetup", "resize", "--size", "255856639", "cr_seed")
    assert plan.steps[4].check.expected == 31_232
    assert plan.steps[5].argv[-2:] == (str(20_480 + 10_240), "vgseed/lvroot")
    assert "online" in plan.steps[6].title


def test_lv_refuses_when_nothing_is_free_after_the_partition() -> None:
    with pytest.raises(grow.GrowRefused) as error:
        grow.plan_lv(seed(1 * GiB // 512), by("40GiB"), backup_dir="/b")
    message = str(error.value)
    assert "no room after partition 2 of /dev/sda" in message
    assert "sda3 starts there" in message
    assert "can grow by at most 23,584,571,392 B" in message  # the 5,623 free extents


def test_lv_not_larger_and_whole_extents() -> None:
    with pytest.raises(grow.GrowRefused, match=r"not larger.*luksvm shrink"):
        grow.plan_lv(seed(0), to("80GiB"), backup_dir="/b")
    with pytest.raises(UsageError, match=r"Use --to 20480e .* or --to 20481e"):
        grow.plan_lv(seed(0), by("1MiB"), backup_dir="/b")


def test_lv_on_a_host_lv_needs_host_extents() -> None:
    layout = seed_layout()
    host = HostLv("/dev/volgrp4/lvseed", "volgrp4", "lvseed", layout.container_size, EXT)
    found = grow.LvLayout(
        dataclasses.replace(layout, container=host), grow.Room(host_free_extents=3)
    )
    with pytest.raises(grow.GrowRefused, match=r"VG volgrp4 has 3 free extents; .* needs 4,617 "):
        grow.plan_lv(found, by("40GiB"), backup_dir="/b")
    found = dataclasses.replace(found, room=grow.Room(host_free_extents=5000))
    plan = grow.plan_lv(found, by("40GiB"), backup_dir="/b")
    assert [s.argv[0] for s in plan.steps[:3]] == ["vgcfgbackup", "vgcfgbackup", "lvextend"]
    assert plan.steps[2].argv[-1] == "volgrp4/lvseed"


def test_room_after_a_partition() -> None:
    part = Partition("/dev/sda2", "/dev/sda", 2, 2048, 1000, 512, "gpt")
    table = {
        "partitiontable": {
            "label": "gpt",
            "lastlba": 999_966,
            "partitions": [
                {"node": "/dev/sda2", "start": 2048},
                {"node": "/dev/sda3", "start": 10_240},
            ],
        }
    }
    room = grow.parse_room(part, table, 1_000_000)
    assert (room.last_lba, room.why) == (10_239, "/dev/sda3 starts at sector 10,240")
    table["partitiontable"]["partitions"].pop()  # type: ignore[index, attr-defined]
    assert grow.parse_room(part, table, 1_000_000).last_lba == 999_966
    dos = {"partitiontable": {"label": "dos", "partitions": [{"node": "/dev/sda2", "start": 2048}]}}
    assert grow.parse_room(part, dos, 1_000_000).last_lba == 999_999


# --- inside the guest: recorded agent replies -----------------------------------------------------


def replies(name: str) -> tuple[Any, Any]:
    data = json.loads((AGENT / f"{name}.json").read_text())
    return data["guest-get-disks"], data["guest-get-fsinfo"]


def test_inside_steps_for_partition_lvm_ext4() -> None:
    inside = grow.plan_inside((0, 0, 4, 0), "vda", *replies("partition-lvm-ext4"))
    assert inside.source == "agent"
    assert [s.argv for s in inside.steps] == [
        ("growpart", "/dev/vda", "2"),
        ("pvresize", "/dev/vda2"),
        ("lvextend", "-l", "+100%FREE", "vgmail/root"),
        ("resize2fs", "/dev/dm-0"),
    ]
    assert "GPT" in inside.steps[0].why


def test_inside_steps_for_pv_on_the_whole_disk_with_xfs() -> None:
    inside = grow.plan_inside((0, 0, 5, 0), "vdb", *replies("disk-lvm-xfs"))
    assert [s.argv for s in inside.steps] == [
        ("pvresize", "/dev/vdb"),
        ("lvextend", "-l", "+100%FREE", "vgdata/srv"),
        ("xfs_growfs", "/srv"),
    ]


def test_inside_never_chooses_between_two_lvs() -> None:
    inside = grow.plan_inside((0, 0, 5, 0), "vdb", *replies("two-lvs"))
    assert [s.argv for s in inside.steps] == [("pvresize", "/dev/vdb")]
    assert "vgdata/srv, vgdata/log" in inside.notes[-1]


def test_inside_without_an_answer_or_a_match_guesses_nothing() -> None:
    for inside in (
        grow.plan_inside((0, 0, 4, 0), "vda", None, None),
        grow.plan_inside((0, 0, 9, 0), "vdc", *replies("partition-lvm-ext4")),
        grow.plan_inside(None, "vda", *replies("partition-lvm-ext4")),
    ):
        assert inside.source == "none" and inside.steps == ()
        assert "could not read the guest's layout" in inside.notes[0]


def test_disk_pci_address_from_the_domain_xml() -> None:
    xml = """<domain><devices><disk type='block' device='disk'><target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/></disk>
      </devices></domain>"""
    assert virt.disk_pci_address(xml, "vda") == (0, 0, 4, 0)
    assert virt.disk_pci_address(xml, "vdb") is None


class RecordedAgent:
    """Answers agent commands from a recorded exchange, in order, and keeps what was asked."""

    def __init__(self, exchange: list[dict[str, Any]]) -> None:
        self.exchange = list(exchange)
        self.asked: list[tuple[str, dict[str, Any] | None]] = []

    def __call__(self, _domain: object, command: str, arguments: Any = None) -> Any:
        self.asked.append((command, arguments))
        expected = self.exchange.pop(0)
        assert expected["execute"] == command
        return expected["return"]


def test_inside_runs_through_guest_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    exchange = json.loads((AGENT / "exec.json").read_text())
    agent = RecordedAgent(exchange["growpart"])
    monkeypatch.setattr(virt, "agent_command", agent)
    domain = virt.Domain(None, "mail")
    inside = grow.Inside("agent", (grow.InsideStep(("growpart", "/dev/vda", "2"), "why"),), ())
    lines: list[str] = []
    grow.run_inside(domain, inside, lines.append)
    assert agent.asked[0] == (
        "guest-exec",
        {"path": "growpart", "arg": ["/dev/vda", "2"], "capture-output": True},
    )
    assert agent.asked[1:] == [("guest-exec-status", {"pid": 1234})] * 2
    assert lines[-1] == "      ok: exit status 0"
    out = base64.b64decode(exchange["growpart"][2]["return"]["out-data"]).decode()
    assert out.startswith("CHANGED: partition=2")


def test_inside_stops_at_the_first_failing_command(monkeypatch: pytest.MonkeyPatch) -> None:
    exchange = json.loads((AGENT / "exec.json").read_text())
    monkeypatch.setattr(virt, "agent_command", RecordedAgent(exchange["failing"]))
    inside = grow.Inside(
        "agent",
        (
            grow.InsideStep(("pvresize", "/dev/vda2"), "why"),
            grow.InsideStep(("lvextend", "-l", "+100%FREE", "vg/lv"), "never reached"),
        ),
        (),
    )
    with pytest.raises(LuksvmError, match=r"pvresize /dev/vda2 exited 5: +Device /dev/vda2 not"):
        grow.run_inside(virt.Domain(None, "mail"), inside, lambda line: None)

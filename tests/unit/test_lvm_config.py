from __future__ import annotations

from luksvm import lvm
from tests.unit.doctor_fakes import fixture

MAPPING_NAMES = [
    "/dev/mapper/cr_imap_encr",
    "/dev/dm-3",
    "/dev/disk/by-id/dm-name-cr_imap_encr",
    "/dev/block/253:3",
]


def test_lvmconfig_output_parses_to_section_keys() -> None:
    values = lvm.parse_config(fixture("lvmconfig-full-reject-then-catch-all.txt"))
    assert values["devices/global_filter"] == ["r|^/dev/mapper/cr_.*|", "a|.*|"]
    assert values["devices/use_devicesfile"] == 0
    assert values["devices/devicesfile"] == "system.devices"
    assert values["global/event_activation"] == 1
    assert "activation/auto_activation_volume_list" not in values


def test_lvm_conf_syntax_with_comments_escapes_and_floats() -> None:
    text = 'a {\n  b = "x\\"y" # note\n  c = [ 1, "two" ]\n  d { e = 0.5 }\n}\n'
    assert lvm.parse_config(text) == {"a/b": 'x"y', "a/c": [1, "two"], "a/d/e": 0.5}


def test_a_reject_in_front_of_a_catch_all_does_not_hide_the_dm_name() -> None:
    # lvm.conf(5): a device is accepted when any of its names is accepted
    assert lvm.filter_accepts(["r|^/dev/mapper/cr_.*|", "a|.*|"], MAPPING_NAMES)


def test_rejecting_every_name_hides_the_device() -> None:
    assert not lvm.filter_accepts(["a|^/dev/sda2$|", "r|.*|"], MAPPING_NAMES)


def test_names_matching_no_pattern_do_not_decide() -> None:
    assert not lvm.filter_accepts(["r|^/dev/mapper/cr_|"], MAPPING_NAMES)
    assert lvm.filter_accepts(["r|^/dev/sdz$|"], MAPPING_NAMES)
    assert lvm.filter_accepts([], MAPPING_NAMES)


def test_first_match_wins_per_name() -> None:
    assert lvm.filter_accepts(["a|/dev/dm-3|", "r|.*|"], MAPPING_NAMES)
    assert not lvm.filter_accepts(["r|dm-|", "a|/dev/dm-3|", "r|.*|"], ["/dev/dm-3"])


def test_a_filter_pattern_matches_exactly_its_path() -> None:
    pattern = lvm.filter_pattern("a", "/dev/disk/by-id/nvme-eui.0025388b71b1b1b1-part2")
    assert pattern == "a|^/dev/disk/by-id/nvme-eui[.]0025388b71b1b1b1-part2$|"
    assert lvm.filter_accepts(
        [pattern, "r|.*|"], ["/dev/disk/by-id/nvme-eui.0025388b71b1b1b1-part2"]
    )
    assert not lvm.filter_accepts(
        [pattern, "r|.*|"], ["/dev/disk/by-id/nvme-euiX0025388b71b1b1b1-part2"]
    )


def test_devices_file_lines_become_fields(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "system.devices"
    path.write_text(
        "# LVM uses devices listed in this file.\n# Created by LVM command vgimportdevices\n"
        "VERSION=1.1.5\n"
        "IDTYPE=sys_wwid IDNAME=naa.600508b1001c2d3e DEVNAME=/dev/sda2 PVID=aBc PART=2\n"
    )
    assert lvm.devices_file_entries(str(path)) == [
        {
            "IDTYPE": "sys_wwid",
            "IDNAME": "naa.600508b1001c2d3e",
            "DEVNAME": "/dev/sda2",
            "PVID": "aBc",
            "PART": "2",
        }
    ]

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luksvm import config
from luksvm.config import ConfigError, parse_crypttab, parse_settings
from tests.conftest import write_config


def problems_of(root: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.load(str(root))
    return [str(p) for p in caught.value.problems]


def test_seed_config_reads_volumes_guests_and_defaults(seed_root: Path) -> None:
    cfg = config.load(str(seed_root))
    assert [v.name for v in cfg.volumes] == ["cr_imap_encr", "cr_web"]
    imap = cfg.volume("cr_imap_encr")
    assert imap.device == "/dev/volgrp4/lvimap_hd0"
    assert imap.key == config.Key("file", path="/etc/luksvm/keys/imap.key")
    assert imap.options == ("luks", "discard")
    assert imap.guests == ("mail",)
    assert imap.mapper_path == "/dev/mapper/cr_imap_encr"
    assert not imap.interactive
    assert [(g.name, g.volumes) for g in cfg.guests] == [
        ("mail", ("cr_imap_encr",)),
        ("web", ("cr_web",)),
    ]
    assert cfg.settings.uri == "qemu:///system"
    assert cfg.settings.guests.stop_timeout == 120_000_000
    assert cfg.settings.backup_keep == 5


def test_fragments_are_read_in_lexical_order(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        {
            "20-b.conf": "vol_b /dev/vg/b - luks,x-luksvm.guest=g\n",
            "10-a.conf": "vol_a /dev/vg/a - luks,x-luksvm.guest=g\n",
            "05-ignored.txt": "this is not a fragment\n",
        },
    )
    cfg = config.load(str(tmp_path))
    assert [v.name for v in cfg.volumes] == ["vol_a", "vol_b"]
    assert cfg.guest("g").volumes == ("vol_a", "vol_b")


def test_key_kinds_and_sources() -> None:
    text = (
        "a UUID=ABCD-1234 -\n"
        "b PARTUUID=0FC63DAF-8483 none luks,noauto\n"
        "c LABEL=my/disk keyring:luksvm/c\n"
        "d /dev/sdb1\n"
    )
    volumes, problems = parse_crypttab(text, "f.conf")
    assert problems == []
    assert [v.key.kind for v in volumes] == ["ask", "ask", "keyring", "ask"]
    # As written: systemd 252's generator keeps the case (measured; the generator test holds it)
    assert volumes[0].device == "/dev/disk/by-uuid/ABCD-1234"
    assert volumes[1].device == "/dev/disk/by-partuuid/0FC63DAF-8483"
    assert volumes[2].device == "/dev/disk/by-label/my\\x2fdisk"
    assert (volumes[2].key.service, volumes[2].key.user) == ("luksvm", "c")
    assert volumes[1].noauto and volumes[1].interactive
    assert volumes[0].interactive and not volumes[0].noauto


def test_headless_token_is_not_interactive() -> None:
    volumes, _ = parse_crypttab("t /dev/sdc - luks,tpm2-device=auto,headless=true\n", "f")
    assert not volumes[0].interactive
    volumes, _ = parse_crypttab("t /dev/sdc - luks,tpm2-device=auto\n", "f")
    assert volumes[0].interactive


@pytest.mark.parametrize(
    ("line", "column", "needle"),
    [
        ("bad/name /dev/sda - luks", 1, "mapping name 'bad/name' is not valid"),
        ("ok relative/dev - luks", 4, "source 'relative/dev'"),
        ("ok /dev/sda keys/imap.key luks", 13, 'key "keys/imap.key" is a relative path'),
        ("ok /dev/sda - luks,x-luksvm.gest=mail", 20, "unknown luksvm option 'x-luksvm.gest'"),
        ("ok /dev/sda - luks,dicard", 20, "unknown crypttab option 'dicard'"),
        ("ok /dev/sda - luks,keyscript=/bin/cat", 20, "for Debian's initramfs scripts"),
        ("ok /dev/sda - plain", 15, "LUKS volumes only"),
        ("ok /dev/sda - luks,x-luksvm.guest=a/b", 20, "expected x-luksvm.guest=NAME"),
        ("ok /dev/sda - luks,x-luksvm.guest=", 20, "expected x-luksvm.guest=NAME"),
        ("ok /dev/sda - luks,,discard", 20, "empty option"),
        ("lonely", 1, "1 field; expected 2 to 4"),
        ("a b c d e", 1, "5 fields; expected 2 to 4"),
        ("ok /dev/sda keyring:nouser luks", 13, "expected keyring:SERVICE/USER"),
    ],
)
def test_each_error_kind_names_line_and_column(line: str, column: int, needle: str) -> None:
    _, problems = parse_crypttab("# comment\n\n" + line + "\n", "/etc/x.conf")
    assert len(problems) == 1, problems
    assert str(problems[0]).startswith(f"/etc/x.conf:3:{column}: ")
    assert needle in problems[0].message


def test_every_error_across_files_is_reported_at_once(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        {
            "10-a.conf": "cr_a /dev/vg/a keys/a.key luks\n",
            "20-b.conf": "\ncr_a /dev/vg/b - luks\ncr_c /dev/vg/c - luks,x-luksvm.nope=1\n",
        },
    )
    found = problems_of(tmp_path)
    base = tmp_path / "etc/luksvm/crypttab.d"
    assert found[0].startswith(f"{base}/10-a.conf:1:16: key")
    assert any(p.startswith(f"{base}/20-b.conf:3:23: unknown luksvm option") for p in found)
    assert any(
        p.startswith(
            f"{base}/20-b.conf:2:1: mapping name 'cr_a' is already defined at {base}/10-a.conf:1:1"
        )
        for p in found
    )
    assert len(found) == 3


def test_same_source_twice_is_an_error(tmp_path: Path) -> None:
    write_config(tmp_path, {"a.conf": "x /dev/vg/a - luks\ny /dev/vg/a - luks\n"})
    (problem,) = problems_of(tmp_path)
    assert "source '/dev/vg/a' is already used at" in problem


def test_settings_parse_with_overrides(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        {
            "a.conf": "cr_m /dev/vg/m - luks,x-luksvm.guest=mail\n"
            "cr_w /dev/vg/w - luks,x-luksvm.guest=web\n"
        },
        settings=(
            "[libvirt]\nuri = qemu:///session\n"
            "[guests]\nstop_timeout = 2min\non_timeout = managedsave\n"
            "[guest:web]\norder = -1\nstop_timeout = 10s\n"
            "[backup]\nkeep = 3\nmax_age = 1w\ndir = /srv/backups/\n"
        ),
    )
    cfg = config.load(str(tmp_path))
    assert cfg.settings.uri == "qemu:///session"
    assert cfg.settings.backup_dir == "/srv/backups"
    assert cfg.settings.backup_keep == 3
    assert cfg.settings.backup_max_age == 7 * 86400 * 10**6
    mail, web = cfg.guest("mail"), cfg.guest("web")
    assert mail.policy == config.GuestPolicy(120 * 10**6, "managedsave", 0, 0)
    assert web.policy == config.GuestPolicy(10 * 10**6, "managedsave", 0, -1)
    assert [g.name for g in cfg.guests] == ["web", "mail"]  # order=-1 first


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[guests]\nstop_timeout = soon\n", "stop_timeout: 'soon' is not a time span"),
        ("[guests]\non_timeout = kill\n", "'kill' is not one of destroy, managedsave, fail"),
        ("[backup]\nkeep = 0\n", "keep: 0 is too small"),
        ("[backup]\nkeep = five\n", "'five' is not a whole number"),
        ("[backup]\ndir = relative\n", "relative path"),
        ("[guests]\nstop_timeot = 1s\n", "unknown setting 'stop_timeot' in [guests]"),
        ("[gests]\n", "unknown section [gests]"),
        ("uri = x\n", "stands before any [section]"),
        ("[libvirt]\nnonsense\n", "expected key = value"),
        ("[libvirt]\nuri = qemu:///system\nuri = test:///default\n", "uri set again"),
    ],
)
def test_settings_errors(text: str, needle: str) -> None:
    _, problems = parse_settings(text, "luksvm.conf")
    assert len(problems) == 1, problems
    assert needle in problems[0].message
    assert str(problems[0]).startswith("luksvm.conf:")


def test_setting_error_points_at_the_value() -> None:
    _, (problem,) = parse_settings("[guests]\nstop_timeout =   soon\n", "c")
    assert (problem.where.line, problem.where.column) == (2, 18)


def test_guest_section_without_volume_is_an_error(tmp_path: Path) -> None:
    write_config(
        tmp_path, {"a.conf": "x /dev/vg/a - luks\n"}, settings="[guest:ghost]\norder = 1\n"
    )
    (problem,) = problems_of(tmp_path)
    assert "[guest:ghost] has settings but no volume names it" in problem


def test_lookup_of_unknown_names_says_what_exists(seed_root: Path) -> None:
    cfg = config.load(str(seed_root))
    with pytest.raises(config.UsageError, match="configured: cr_imap_encr, cr_web"):
        cfg.volume("nope")
    with pytest.raises(config.UsageError, match="configured guests: mail, web"):
        cfg.guest("nope")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parsers_raise_nothing_but_config_problems(text: str) -> None:
    _, problems = parse_crypttab(text, "fuzz.conf")
    assert all(isinstance(p, config.Problem) for p in problems)
    _, problems = parse_settings(text, "fuzz.conf")
    assert all(isinstance(p, config.Problem) for p in problems)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "cr",
                "/dev/x",
                "-",
                "luks",
                "x-luksvm.guest=g",
                ",",
                " ",
                "\t",
                "\n",
                "#",
                "UUID=",
                "keyring:",
                "/",
                "=",
                "[guests]",
                "noauto",
            ]
        ),
        max_size=30,
    )
)
def test_load_on_crypttab_like_noise_raises_only_config_error(
    tmp_path_factory: pytest.TempPathFactory, parts: list[str]
) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    write_config(root, {"a.conf": "".join(parts)}, settings="".join(reversed(parts)))
    try:
        config.load(str(root))
    except ConfigError as error:
        assert error.problems

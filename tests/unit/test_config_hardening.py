"""What `config check` accepts is what `apply` renders and systemd honours (issue 15, defects 3-8
and 11, configuration side). Each test failed before its fix."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from luksvm import backup, config, crypttab_options, files, migrate, units
from luksvm.cli import build_parser, main
from luksvm.config import ConfigError, parse_crypttab, parse_settings
from luksvm.durations import parse_timespan
from luksvm.errors import LuksvmError, UsageError
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[2]


def problems(text: str) -> list[str]:
    return [str(p) for p in parse_crypttab(text, "f.conf")[1]]


def one_problem(text: str) -> str:
    (found,) = problems(text)
    return found


def render(root: Path) -> units.Rendering:
    return units.render(config.load(str(root)), luksvm_path="/l", template_dir="/t")


# --- defect 3: values systemd would ignore, paths it cannot name -----------------------------


@pytest.mark.parametrize(
    ("option", "column", "expected"),
    [
        ("x-systemd.device-timeout=abc", 20, "x-systemd.device-timeout=: 'abc' is not a time span"),
        ("tries=abc", 20, "tries=: 'abc' is not a whole number"),
        ("tries=99999999999", 20, "tries=: 99999999999 is too large"),
        ("discard=yes", 20, "discard takes no value"),
        ("noauto=no", 20, "noauto takes no value"),
        ("headless=maybe", 20, "headless=: 'maybe' is not a boolean"),
        ("keyfile-offset=-1", 20, "keyfile-offset=: '-1' is not a whole number"),
        ("sector-size=1000", 20, "sector-size=: '1000' is not a sector size"),
        ("size=250", 20, "size=: 250 is not a multiple of 8"),
        ("timeout=5parsecs", 20, "timeout=: '5parsecs'"),
        ("tpm2-pcrs=7+99", 20, "tpm2-pcrs=: PCR 99 does not exist"),
        ("tpm2-signature=sig.json", 20, "tpm2-signature=: 'sig.json' is not an absolute"),
        ("cipher", 20, "cipher needs a value"),
    ],
)
def test_option_values_systemd_would_ignore_are_refused_at_their_column(
    option: str, column: int, expected: str
) -> None:
    found = one_problem(f"a /dev/vg/a - luks,{option}\n")
    assert found.startswith(f"f.conf:1:{column}: {expected}"), found


@pytest.mark.parametrize(
    "option",
    [
        "headless",
        "headless=true",
        "headless=0",
        "tries=0",
        "discard",
        "allow-discards",
        "keyslot=1",
        "timeout=0",
        "timeout=infinity",
        "x-systemd.device-timeout=1min 30s".replace(" ", ""),
        "x-systemd.device-timeout=infinity",
        "x-systemd.device-timeout=0",
        "tpm2-device=auto",
        "tpm2-pcrs=7+11",
        "tpm2-pcrs=",
        "fido2-cid=YWJj",
        "password-echo=masked",
        "sector-size=4096",
        "keyfile-offset=18446744073709551615",
    ],
)
def test_option_values_systemd_reads_pass_and_render(option: str, tmp_path: Path) -> None:
    assert problems(f"a /dev/vg/a - luks,{option}\n") == []
    write_config(tmp_path, {"a.conf": f"a /dev/vg/a - luks,{option}\n"})
    assert render(tmp_path).files


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("/dev/../x", "has a .. component"),
        ("/dev/" + "a" * 256, "has a component of 256 bytes"),
        ("/dev/a/" + "/".join(["b" * 250] * 17), "bytes long; a path has fewer than 4096"),
        ("/dev/" + "/".join(["c" * 200] * 2), "its systemd unit name would be"),
    ],
)
def test_sources_systemd_cannot_name_a_device_unit_for_are_refused(
    source: str, expected: str
) -> None:
    found = one_problem(f"a {source} - luks\n")
    assert found.startswith("f.conf:1:3: source") and expected in found, found


def test_key_paths_systemd_cannot_wait_for_are_refused() -> None:
    found = one_problem("a /dev/vg/a /etc/luksvm/../k luks\n")
    assert found.startswith("f.conf:1:13: key") and ".. component" in found


def test_durations_beyond_systemd_are_refused_where_they_are_written() -> None:
    text = (
        "[guests]\nstop_timeout = 99999999999999999999d\n[guest:g]\nstart_delay = 213503982d 8h\n"
    )
    _, found = parse_settings(text, "l.conf")
    assert [str(p).split(":")[:3] for p in found] == [["l.conf", "2", "16"], ["l.conf", "4", "15"]]
    assert "too long" in str(found[0]) and "too long" in str(found[1])


def test_every_duration_config_accepts_renders_a_timeout_systemd_parses(tmp_path: Path) -> None:
    settings = "[guests]\nstop_timeout = 584000y\non_timeout = managedsave\n"
    write_config(tmp_path, {"a.conf": "a /dev/vg/a - luks,x-luksvm.guest=g\n"}, settings)
    rendered = render(tmp_path).files["luksvm-guest@g.service.d/50-luksvm.conf"]
    (stop,) = re.findall(r"^TimeoutStopSec=(.*)$", rendered, re.M)
    assert parse_timespan(stop) > 584000 * 31_557_600 * 10**6


def test_timespans_refuse_what_systemd_refuses() -> None:
    for text in ("99999999999999999999d", "10000000000000000000us", "3.", "5mo", "-1s"):
        with pytest.raises(ValueError):
            parse_timespan(text)
    assert parse_timespan(".5s") == 500_000 and parse_timespan("5 6") == 11_000_000


def test_options_newer_than_the_installed_systemd_are_named_with_their_version(
    tmp_path: Path,
) -> None:
    volumes, _ = parse_crypttab("a /dev/vg/a - luks,fixate-volume-key=ab,headless\n", "f.conf")
    cfg = config.Config("/", tuple(volumes), (), config.Settings(), ())
    (warning,) = config.option_warnings(cfg, 252)
    assert str(warning).startswith("f.conf:1:20: fixate-volume-key= needs systemd 260")
    assert config.option_warnings(cfg, 260) == []
    assert config.option_warnings(cfg, None) == []


def test_installed_systemd_version_is_read_under_the_root(tmp_path: Path) -> None:
    assert crypttab_options.installed_systemd_version(str(tmp_path)) is None
    lib = tmp_path / "usr/lib/x86_64-linux-gnu/systemd"
    lib.mkdir(parents=True)
    (lib / "libsystemd-shared-257.so").write_text("")
    assert crypttab_options.installed_systemd_version(str(tmp_path)) == 257


def test_config_check_prints_the_version_warning_and_still_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(tmp_path, {"a.conf": "a /dev/vg/a - luks,link-volume-key=@u::k\n"})
    lib = tmp_path / "usr/lib/systemd"
    lib.mkdir(parents=True)
    (lib / "libsystemd-shared-252.so").write_text("")
    assert main(["--root", str(tmp_path), "config", "check"]) == 0
    err = capsys.readouterr().err
    assert "a.conf:1:20: link-volume-key= needs systemd 256; this host has systemd 252" in err


# --- defect 4: names that read as options -------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "-data /dev/vg/a - luks\n",
        "--all /dev/vg/a - luks\n",
        "a /dev/vg/a - luks,x-luksvm.guest=-g\n",
    ],
)
def test_names_starting_with_a_dash_are_refused(line: str) -> None:
    found = one_problem(line)
    assert "not starting with -" in found


def test_guest_sections_starting_with_a_dash_are_refused() -> None:
    _, found = parse_settings("[guest:--all]\norder = 1\n", "l.conf")
    assert "not starting with -" in str(found[0])


def test_every_template_puts_double_dash_before_the_instance() -> None:
    seen = 0
    for path in sorted((REPO / "units").iterdir()):
        for line in path.read_text().splitlines():
            if re.match(r"Exec\w+=", line) and re.search(r"%[iI]", line):
                seen += 1
                assert re.search(r" -- %[iI]$", line), (path.name, line)
    assert seen == 4


def test_a_dash_name_after_double_dash_is_a_name_not_an_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(tmp_path, {"a.conf": "cr_a /dev/vg/a - luks\n"})
    assert main(["--root", str(tmp_path), "unlock", "--no-start", "--dry-run", "--", "--all"]) == 64
    assert "no volume '--all'" in capsys.readouterr().err


# --- defect 5: device paths and unit names as systemd's generator makes them --------------------


@pytest.mark.parametrize(
    ("source", "device", "unit"),
    [
        (
            "LABEL=dätä",
            "/dev/disk/by-label/dätä",
            r"dev-disk-by\x2dlabel-d\xc3\xa4t\xc3\xa4.device",
        ),
        (
            "PARTLABEL=a/b",
            r"/dev/disk/by-partlabel/a\x2fb",
            r"dev-disk-by\x2dpartlabel-a\x5cx2fb.device",
        ),
        ("LABEL=x\\y", r"/dev/disk/by-label/x\x5cy", r"dev-disk-by\x2dlabel-x\x5cx5cy.device"),
        ("LABEL='s'", "/dev/disk/by-label/s", "dev-disk-by\\x2dlabel-s.device"),
        (
            "LABEL=x\u00a0y",
            "/dev/disk/by-label/x\u00a0y",
            r"dev-disk-by\x2dlabel-x\xc2\xa0y.device",
        ),
        (
            "LABEL=a\ufdd0b",
            r"/dev/disk/by-label/a\xef\xb7\x90b",
            r"dev-disk-by\x2dlabel-a\x5cxef\x5cxb7\x5cx90b.device",
        ),
        ("UUID=ABCD-12", "/dev/disk/by-uuid/ABCD-12", r"dev-disk-by\x2duuid-ABCD\x2d12.device"),
    ],
)
def test_tag_sources_resolve_byte_for_byte_as_the_generator(
    source: str, device: str, unit: str
) -> None:
    (volume,), found = parse_crypttab(f"a {source} - luks\n", "f.conf")
    assert found == []
    assert volume.device == device
    assert units.device_unit(volume.device) == unit


# --- defect 6: files that are not files ----------------------------------------------------------


def test_root_that_does_not_exist_is_an_error_not_zero_volumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--root", str(tmp_path / "nonexistent"), "config", "check"]) == 64
    assert "nonexistent:1:1: cannot use --root" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["--root", str(tmp_path / "file"), "config", "check"]) == 64


@pytest.mark.parametrize("kind", ["file", "loop"])
def test_crypttab_d_that_is_not_a_folder_is_an_error(tmp_path: Path, kind: str) -> None:
    (tmp_path / "etc/luksvm").mkdir(parents=True)
    directory = tmp_path / "etc/luksvm/crypttab.d"
    if kind == "file":
        directory.write_text("a /dev/vg/a\n")
    else:
        directory.symlink_to(directory)
    with pytest.raises(ConfigError) as caught:
        config.load(str(tmp_path))
    (found,) = caught.value.problems
    assert str(found).startswith(f"{directory}:1:1: cannot list: ")


@pytest.mark.parametrize("which", ["etc/luksvm/crypttab.d/10-a.conf", "etc/luksvm/luksvm.conf"])
def test_a_fifo_in_place_of_a_config_file_is_refused_without_blocking(
    tmp_path: Path, which: str
) -> None:
    write_config(tmp_path, {})
    os.mkfifo(tmp_path / which)
    with pytest.raises(ConfigError) as caught:
        config.load(str(tmp_path))
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path / which}:1:1: cannot read: it is a FIFO, not a regular file"
    ]


@pytest.mark.parametrize("which", ["crypttab", "settings"])
def test_nul_bytes_are_refused_at_their_line(which: str) -> None:
    if which == "crypttab":
        found = problems("a /dev/vg/a - luks\nb /dev/vg/\0b - luks\n")
    else:
        found = [str(p) for p in parse_settings("[backup]\ndir = /var/\0x\n", "f.conf")[1]]
    assert found == [
        "f.conf:2:" + ("11" if which == "crypttab" else "12") + ": a NUL byte; "
        "configuration files are text (remove it)"
    ]


# --- defect 7: lines and fields as systemd reads crypttab ----------------------------------------


def test_lines_end_where_systemd_ends_them() -> None:
    assert config.read_lines("a\fb\vc\u2028d\x1ce\n") == ["a\fb\vc\u2028d\x1ce"]
    assert config.read_lines("a\r\nb\n\rc\r\rd\n") == ["a", "b", "c", "", "d"]
    assert config.read_lines("x") == ["x"] and config.read_lines("") == []


def test_errors_name_the_line_systemd_counts() -> None:
    text = "# a form feed \f and a line separator \u2028 stay in their line\nbroken\n"
    assert problems(text) == ["f.conf:2:1: 1 field; expected 2 to 4: NAME SOURCE [KEY [OPTIONS]]"]


def test_fields_split_at_c_white_space_only() -> None:
    (volume,), found = parse_crypttab("a\f/dev/vg/a\v-\tluks\n", "f.conf")
    assert found == [] and (volume.name, volume.device) == ("a", "/dev/vg/a")
    found_nbsp = problems("a\u00a0/dev/vg/a /dev/vg/b\n")
    assert found_nbsp[0].startswith("f.conf:1:1: mapping name 'a\\xa0/dev/vg/a' is not valid")


# --- defect 8: inline comments in luksvm.conf, the README example ---------------------------------


def test_inline_comments_are_accepted() -> None:
    text = "[guests]\nstop_timeout = 90s   # ACPI wait\non_timeout = fail\t# keep it\n"
    settings, found = parse_settings(text, "l.conf")
    assert found == []
    assert (settings.guests.stop_timeout, settings.guests.on_timeout) == (90_000_000, "fail")


def test_the_readme_example_pastes_cleanly() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    block = section.split("Settings live in", 1)[1].split("\n\n", 2)[1]
    text = "\n".join(line[4:] for line in block.splitlines())
    assert "[guests]" in text and "#" in text
    settings, found = parse_settings(text, "README")
    assert found == []
    assert settings.guests.stop_timeout == 120_000_000


# --- defect 11: messages -------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["header=/h.img", "auto", "tcrypt-veracrypt", "bitlk"])
def test_options_luksvm_does_not_support_say_so_and_why(option: str) -> None:
    found = one_problem(f"a /dev/vg/a - luks,{option}\n")
    assert f"option {option.split('=', maxsplit=1)[0]!r} is not supported by luksvm: " in found


@pytest.mark.parametrize(
    ("key", "keyfile", "device"),
    [
        ("keyfile:LABEL=keydev", "keyfile", "LABEL=keydev"),
        ("/k/a.key:/dev/sdb1", "/k/a.key", "/dev/sdb1"),
    ],
)
def test_a_keyfile_on_another_device_gets_advice_that_works(
    key: str, keyfile: str, device: str
) -> None:
    found = one_problem(f"a /dev/vg/a {key} luks\n")
    assert f"is keyfile {keyfile!r} on device {device}" in found
    assert f"/etc/luksvm/keys/{os.path.basename(keyfile)} (root-owned" in found
    assert "keys/keyfile:" not in found


def test_a_colon_that_names_no_device_is_part_of_the_keyfile_path() -> None:
    (volume,), found = parse_crypttab("a /dev/vg/a /k/a:b luks\n", "f.conf")
    assert found == [] and volume.key.path == "/k/a:b"


def test_a_keyfile_volume_with_headless_false_is_interactive_and_not_before_libvirt(
    tmp_path: Path,
) -> None:
    write_config(tmp_path, {"a.conf": "a /dev/vg/a /k/a.key luks,headless=false\n"})
    (volume,) = config.load(str(tmp_path)).volumes
    assert volume.interactive
    dropin = render(tmp_path).files["luksvm-unlock@a.service.d/50-luksvm.conf"]
    assert "libvirtd.service" not in dropin


def test_a_backup_dir_that_is_a_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    for path in (tmp_path / "file", tmp_path / "file/sub"):
        with pytest.raises(LuksvmError, match=r"cannot make the header backup folder .*not a"):
            backup.prepare_directory(str(path))


@pytest.mark.parametrize("text", ["0001-01-01", "9999-12-31T23:59:59-01:00"])
def test_prune_before_at_the_edge_of_time_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="out of the range of dates"):
        backup.parse_date(text)


def test_a_state_folder_that_is_a_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "var/lib").mkdir(parents=True)
    (tmp_path / "var/lib/luksvm").write_text("")
    with pytest.raises(LuksvmError, match=r"var/lib/luksvm is not a folder"):
        files.write_atomically(str(tmp_path / "var/lib/luksvm/migrate/g.vda.json"), "{}")
    (tmp_path / "var/lib/luksvm").unlink()
    (tmp_path / "var/lib/luksvm").mkdir()
    (tmp_path / "var/lib/luksvm/migrate").write_text("")
    with pytest.raises(LuksvmError, match="cannot read migration records"):
        migrate.states_of(str(tmp_path), "g")


def test_the_manual_example_of_luksvm_conf_parses_cleanly() -> None:
    page = (REPO / "docs/luksvm.conf.5.in").read_text()
    example = page.split(".SH EXAMPLE", 1)[1].split(".nf\n", 1)[1].split(".fi", 1)[0]
    text = "\n".join(
        line.replace("\\-", "-") for line in example.splitlines() if not line.startswith(".")
    )
    assert "#" in text
    settings, found = parse_settings(text, "luksvm.conf(5)")
    assert found == [] and settings.guests.stop_timeout == 180_000_000


def test_apply_names_options_the_installed_systemd_would_ignore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(tmp_path, {"a.conf": "a /dev/vg/a - luks,tpm2-pcrlock=/p.json\n"})
    lib = tmp_path / "usr/lib/systemd"
    lib.mkdir(parents=True)
    (lib / "libsystemd-shared-252.so").write_text("")
    assert main(["--root", str(tmp_path), "apply", "--dry-run"]) == 0
    assert "a.conf:1:20: tpm2-pcrlock= needs systemd 255" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["guest", "start", "--", "-g"], "guest", "-g"),
        (["guest", "stop", "--", "-g"], "guest", "-g"),
        (["lock", "--from-unit", "--", "-v"], "names", ["-v"]),
        (["unlock", "--no-start", "--", "--all"], "names", ["--all"]),
    ],
)
def test_every_template_command_line_reads_the_instance_after_double_dash_as_a_name(
    argv: list[str], field: str, value: object
) -> None:
    assert getattr(build_parser().parse_args(argv), field) == value


def test_generator_options_luksvm_implements_itself_get_no_version_warning() -> None:
    volumes, _ = parse_crypttab("a /dev/vg/a - luks,keyfile-timeout=5s,x-initrd.attach\n", "f")
    cfg = config.Config("/", tuple(volumes), (), config.Settings(), ())
    assert config.option_warnings(cfg, 230) == []

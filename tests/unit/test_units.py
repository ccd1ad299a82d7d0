from __future__ import annotations

import os
from pathlib import Path

import pytest

from luksvm import apply, config, units
from luksvm.errors import UsageError
from tests.conftest import MIXED_CRYPTTAB, MIXED_SETTINGS, SEED_CRYPTTAB, write_config

GOLDEN = Path(__file__).parent / "golden"


def rendered(root: Path, **kwargs: object) -> str:
    """A rendering as one reviewable text: each file under "== path", then the links."""
    result = units.render(
        config.load(str(root)),
        luksvm_path=str(kwargs.get("luksvm_path", "/usr/bin/luksvm")),
        template_dir="/usr/lib/systemd/system",
    )
    out = []
    for path, text in sorted(result.files.items()):
        out += [f"== {path}", text]
    out += ["== links"] + [f"{p} -> {t}" for p, t in sorted(result.links.items())]
    return "\n".join(out) + "\n"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("LUKSVM_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"rendering differs from {path} (LUKSVM_UPDATE_GOLDEN=1)"


def test_seed_rendering_matches_golden(seed_root: Path) -> None:
    check_golden("units-seed.txt", rendered(seed_root))


def test_mixed_rendering_matches_golden(tmp_path: Path) -> None:
    root = write_config(
        tmp_path, {"10-seed.conf": SEED_CRYPTTAB, "20-mixed.conf": MIXED_CRYPTTAB}, MIXED_SETTINGS
    )
    check_golden("units-mixed.txt", rendered(root))


def render_mixed(tmp_path: Path) -> units.Rendering:
    root = write_config(
        tmp_path, {"10-seed.conf": SEED_CRYPTTAB, "20-mixed.conf": MIXED_CRYPTTAB}, MIXED_SETTINGS
    )
    return units.render(
        config.load(str(root)), luksvm_path="/usr/bin/luksvm", template_dir="/usr/lib/x"
    )


def test_only_volumes_that_never_prompt_unlock_before_libvirt(tmp_path: Path) -> None:
    files = render_mixed(tmp_path).files
    before_libvirt = {
        path.split(".service.d")[0]
        for path, text in files.items()
        if "Before=libvirtd.service virtqemud.service" in text
    }
    assert before_libvirt == {
        "luksvm-unlock@cr_imap_encr",
        "luksvm-unlock@cr_web",
        "luksvm-unlock@cr_files",
    }


def test_passphrase_volumes_are_chained_in_config_order(tmp_path: Path) -> None:
    files = render_mixed(tmp_path).files
    scratch = files["luksvm-unlock@cr_scratch.service.d/50-luksvm.conf"]
    assert "After=luksvm-unlock@cr\\x2dweb\\x2ddata.service" in scratch
    first = files["luksvm-unlock@cr\\x2dweb\\x2ddata.service.d/50-luksvm.conf"]
    assert "After=luksvm-unlock@" not in first


def test_target_wants_no_noauto_volume_nor_a_guest_that_needs_one(tmp_path: Path) -> None:
    links = render_mixed(tmp_path).links
    assert sorted(links) == [
        "luksvm.target.wants/luksvm-guest@backup.service",
        "luksvm.target.wants/luksvm-guest@files.service",
        "luksvm.target.wants/luksvm-guest@mail.service",
        "luksvm.target.wants/luksvm-shutdown-watch.service",
        "luksvm.target.wants/luksvm-unlock@cr_files.service",
        "luksvm.target.wants/luksvm-unlock@cr_imap_encr.service",
        "luksvm.target.wants/luksvm-unlock@cr_scratch.service",
        "luksvm.target.wants/luksvm-unlock@cr_web.service",
    ]
    assert links["luksvm.target.wants/luksvm-guest@mail.service"] == (
        "/usr/lib/x/luksvm-guest@.service"
    )


def test_the_shutdown_watch_is_wanted_only_when_there_are_guests(tmp_path: Path) -> None:
    with_guests = units.render(
        config.load(str(write_config(tmp_path / "a", {"10-seed.conf": SEED_CRYPTTAB}))),
        luksvm_path="/l",
        template_dir="/t",
    ).links
    assert with_guests["luksvm.target.wants/luksvm-shutdown-watch.service"] == (
        "/t/luksvm-shutdown-watch.service"
    )
    volumes_only = write_config(tmp_path / "b", {"10-v.conf": "cr_a /dev/vg/a - luks\n"})
    links = units.render(config.load(str(volumes_only)), luksvm_path="/l", template_dir="/t").links
    assert sorted(links) == ["luksvm.target.wants/luksvm-unlock@cr_a.service"]


def test_guest_stop_timeout_covers_wait_policy_and_margin(tmp_path: Path) -> None:
    files = render_mixed(tmp_path).files
    # mail: 2min + managedsave 10min + 30s; files: 10min + fail 0 + 30s; web: 2min + 30s + 30s
    assert "TimeoutStopSec=12min 30s" in files["luksvm-guest@mail.service.d/50-luksvm.conf"]
    assert "TimeoutStopSec=10min 30s" in files["luksvm-guest@files.service.d/50-luksvm.conf"]
    assert "TimeoutStopSec=3min\n" in files["luksvm-guest@web.service.d/50-luksvm.conf"]


def test_guest_start_timeout_covers_waiting_and_start_delay(tmp_path: Path) -> None:
    root = write_config(
        tmp_path, {"10-seed.conf": SEED_CRYPTTAB}, "[guest:web]\nstart_delay=2min\n"
    )
    files = units.render(config.load(str(root)), luksvm_path="/l", template_dir="/t").files
    assert "TimeoutStartSec=12min 30s" in files["luksvm-guest@mail.service.d/50-luksvm.conf"]
    assert "TimeoutStartSec=14min 30s" in files["luksvm-guest@web.service.d/50-luksvm.conf"]


def test_guests_are_not_ordered_against_one_another(tmp_path: Path) -> None:
    # Ordered guests would stop one after another at shutdown; `guest start` keeps `order`.
    for path, text in render_mixed(tmp_path).files.items():
        if path.startswith("luksvm-guest@"):
            assert "luksvm-guest@" not in text


def test_keyring_backend_reaches_every_unlock_unit_through_the_template(tmp_path: Path) -> None:
    files = render_mixed(tmp_path).files
    assert (
        "Environment=PYTHON_KEYRING_BACKEND=keyrings.alt.file.PlaintextKeyring"
        in files["luksvm-unlock@.service.d/50-luksvm-keys.conf"]
    )


def test_no_keyring_dropin_without_the_setting(seed_root: Path) -> None:
    files = units.render(config.load(str(seed_root)), luksvm_path="/x/luksvm", template_dir="/t")
    assert not [p for p in files.files if p.startswith("luksvm-unlock@.service.d")]


def test_every_generated_file_has_the_header_and_its_source(tmp_path: Path) -> None:
    for text in render_mixed(tmp_path).files.values():
        assert text.startswith(units.HEADER + " from /etc/luksvm/")
        assert "\nSourcePath=/etc/luksvm/" in text


def test_templates_are_rendered_with_the_running_luksvm() -> None:
    text = units.render_template(
        units.UNLOCK_TEMPLATE,
        "RequiresMountsFor=/usr/bin/luksvm\nExecStart=/usr/bin/luksvm unlock --no-start -- %I\n",
        "/opt/luks vm/bin/luksvm",
    )
    assert text.splitlines() == [
        units.HEADER + " from luksvm's luksvm-unlock@.service",
        'RequiresMountsFor="/opt/luks vm/bin/luksvm"',
        'ExecStart="/opt/luks vm/bin/luksvm" unlock --no-start -- %I',
    ]


@pytest.mark.parametrize(
    ("path", "word"),
    [
        ("/usr/local/bin/luksvm", "/usr/local/bin/luksvm"),
        ("/opt/100%/luksvm", "/opt/100%%/luksvm"),
        ('/opt/a "b"\\c/luksvm', '"/opt/a \\"b\\"\\\\c/luksvm"'),
    ],
)
def test_unit_word_quotes_what_systemd_would_split_or_expand(path: str, word: str) -> None:
    assert units.unit_word(path) == word


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("cr-client-a", "cr\\x2dclient\\x2da"),
        ("cr_imap_encr", "cr_imap_encr"),
        (".hidden", "\\x2ehidden"),
        ("a.b.", "a.b."),
        ("über", "\\xc3\\xbcber"),
        ("a b\\c", "a\\x20b\\x5cc"),
        ("a/b", "a-b"),
        ("", ""),
    ],
)
def test_escape_examples(text: str, escaped: str) -> None:
    assert units.systemd_escape(text) == escaped


@pytest.mark.parametrize(
    ("path", "escaped"),
    [
        ("/", "-"),
        ("", "-"),
        ("/dev/volgrp4/lvimap_hd0", "dev-volgrp4-lvimap_hd0"),
        ("//dev/./mapper//x-y/", "dev-mapper-x\\x2dy"),
        ("/dev/disk/by-uuid/0a1b", "dev-disk-by\\x2duuid-0a1b"),
        ("/./.x", "\\x2ex"),
    ],
)
def test_path_escape_examples(path: str, escaped: str) -> None:
    assert units.systemd_escape_path(path) == escaped


def test_path_with_dotdot_is_refused() -> None:
    with pytest.raises(ValueError, match="normalized"):
        units.systemd_escape_path("/dev/../x")


def test_unit_names_longer_than_systemd_allows_are_refused_with_their_line(
    tmp_path: Path,
) -> None:
    root = write_config(
        tmp_path, {"10-a.conf": "ok /dev/vg/a - luks\n" + "=" * 100 + " /dev/vg/b\n"}
    )
    # config check refuses it already: what it accepts, render renders
    with pytest.raises(UsageError, match=r"10-a.conf:2:1: volume '=+': its systemd unit name"):
        units.render(config.load(str(root)), luksvm_path="/l", template_dir="/t")


def test_bad_device_timeout_names_its_line(tmp_path: Path) -> None:
    root = write_config(
        tmp_path, {"10-a.conf": "a /dev/vg/a - luks,x-systemd.device-timeout=soon\n"}
    )
    with pytest.raises(UsageError, match=r"10-a.conf:1:20: x-systemd.device-timeout=: 'soon'"):
        units.render(config.load(str(root)), luksvm_path="/l", template_dir="/t")


def test_unit_names_for_other_modules() -> None:
    assert units.unlock_unit("cr-client-a") == "luksvm-unlock@cr\\x2dclient\\x2da.service"
    assert units.guest_unit("web") == "luksvm-guest@web.service"
    assert units.device_unit("/dev/volgrp4/lvimap_hd0") == "dev-volgrp4-lvimap_hd0.device"


def test_unlock_units_lock_before_lvm_blkdeactivate_runs_at_shutdown() -> None:
    # Stop order is the reverse of start order: After= here makes every lock finish before
    # blk-availability.service's blkdeactivate starts taking block devices down (seen racing in
    # the VM without it).
    text = apply.shipped_templates()[units.UNLOCK_TEMPLATE]
    after = [w for line in text.splitlines() if line.startswith("After=") for w in line[6:].split()]
    assert "blk-availability.service" in after


def test_a_direct_unit_escapes_its_attach_words_as_systemd_reads_them(tmp_path: Path) -> None:
    root = write_config(tmp_path, {"10.conf": "cr_a /dev/vg/a /etc/k%1/a.key luks\n"})
    cfg = config.load(str(root))
    argv = ("/usr/lib/systemd/systemd-cryptsetup", "attach", "cr_a", "/dev/vg/a")
    argv += ("/etc/k%1/a.key", "luks,headless=true,tries=1")
    files = units.render(
        cfg, luksvm_path="/usr/bin/luksvm", template_dir="/x", attach={"cr_a": argv}
    ).files
    text = files["luksvm-unlock@cr_a.service.d/50-luksvm.conf"]
    assert (
        "ExecStart=\nExecStart=/usr/lib/systemd/systemd-cryptsetup attach cr_a /dev/vg/a "
        "/etc/k%%1/a.key luks,headless=true,tries=1\n"
    ) in text
    assert "LogExtraFields=LUKSVM_VOLUME=cr_a\nLogExtraFields=LUKSVM_KEY_SOURCE=keyfile\n" in text
    assert "Before=libvirtd.service virtqemud.service" in text  # still ahead of libvirt


@pytest.mark.parametrize(
    ("line", "direct"),
    [
        ("cr_a /dev/vg/a /etc/k luks,discard,x-luksvm.guest=g", True),
        ("cr_a /dev/vg/a /etc/k luks,noauto,nofail,_netdev", True),
        ("cr_a /dev/vg/a - luks", False),  # a prompt: luksvm's (ask-password, keyring cache)
        ("cr_a /dev/vg/a keyring:s/u luks", False),  # python keyring
        ("cr_a /dev/vg/a /etc/k luks,tpm2-device=auto", False),  # one attempt per source
        ("cr_a /dev/vg/a /etc/k luks,keyfile-timeout=10s", False),  # generator-only
    ],
)
def test_which_volumes_attach_directly(tmp_path: Path, line: str, direct: bool) -> None:
    root = write_config(tmp_path, {"10.conf": line + "\n"})
    assert apply.attaches_directly(config.load(str(root)).volumes[0]) is direct

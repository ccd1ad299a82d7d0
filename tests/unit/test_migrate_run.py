"""The migrate executor against a fake world: every process call is answered in memory, so the
order of steps, what goes on stdin, resuming after a kill and rollback are tested without
devices. The real tools are exercised in tests/integration/test_migrate.py and the VM tier."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from luksvm import blockdev, config, cryptsetup, keys, lvm, migrate, qemuimg
from luksvm.config import Config, Volume
from luksvm.cryptsetup import LuksHeader, MappingStatus
from luksvm.errors import LuksvmError, UsageError
from luksvm.run import CommandError, Result

MiB = 1024**2
DISK_SIZE = 64 * MiB
KEY = b"correct horse battery staple"

DOMAIN = """<domain type='kvm'>
  <name>mail</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{source}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
    </interface>
  </devices>
</domain>"""


class KilledDuringCopy(BaseException):
    """What SIGKILL looks like from inside: the process just ends mid-step."""


@dataclass
class World:
    root: Path
    source: Path
    lvs: dict[str, int] = field(default_factory=dict)
    formatted: bool = False
    mapping_open: bool = False
    guest_state: str = "shutoff"
    xml: str = ""
    calls: list[tuple[str, ...]] = field(default_factory=list)
    stdins: dict[str, bytes] = field(default_factory=dict)
    kill_copy_at: float | None = None
    copy_differs: bool = False
    services: list[str] = field(default_factory=list)
    out: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    # --- the terminal and keys.py's key test (cryptsetup open --test-passphrase) ---

    def ask(self, prompt: str) -> str:
        self.services.append(f"ask: {prompt}")
        return self.answers.pop(0)

    def test_key(
        self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None, **_: object
    ) -> Result:
        assert tuple(argv[:3]) == ("cryptsetup", "open", "--test-passphrase"), argv
        self.calls.append(("cryptsetup", "test-passphrase"))
        return Result(tuple(argv), 0 if stdin == KEY else 2, "", "")

    # --- processes ---

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        stdin: bytes | None = None,
        check: bool = True,
        secret: bool = False,
    ) -> Result:
        argv = tuple(argv)
        self.calls.append(argv)
        out = ""
        if argv[0] == "vgs":
            out = lvm_json("vg", [{"vg_name": "vg0", "vg_extent_size": str(4 * MiB),
                                   "vg_free": str(10 * 1024 * MiB)}])  # fmt: skip
        elif argv[0] == "lvs":
            out = lvm_json("lv", [{"lv_name": n, "lv_size": str(s)} for n, s in self.lvs.items()])
        elif argv[0] == "lvcreate":
            self.lvs[argv[argv.index("--name") + 1]] = int(argv[argv.index("--size") + 1][:-1])
        elif argv[:2] == ("cryptsetup", "luksFormat"):
            self.formatted = True
            self.stdins["format"] = stdin or b""
        elif argv[:2] == ("cryptsetup", "open"):
            self.mapping_open = True
            self.stdins["open"] = stdin or b""
        elif argv[:2] == ("qemu-img", "info"):
            out = json.dumps({"format": "qcow2", "virtual-size": DISK_SIZE})
        elif argv[:2] == ("systemctl", "start"):
            pass
        else:
            raise AssertionError(f"unexpected command {argv}")
        return Result(argv, 0, out, "")

    def stream(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        on_output: Callable[[str], None],
        check: bool = True,
    ) -> Result:
        argv = tuple(argv)
        self.calls.append(argv)
        assert self.mapping_open, "copy or compare with the mapping closed"
        for percent in (0.0, 25.0, 50.0, 75.0, 100.0):
            killed_at = self.kill_copy_at if argv[1] == "convert" else None
            if killed_at is not None and percent >= killed_at:
                raise KilledDuringCopy
            on_output(f"    ({percent:.2f}/100%)")
        if argv[1] == "compare" and self.copy_differs:
            raise CommandError(argv, 1, "Content mismatch at offset 4096!", "exit status 1")
        return Result(argv, 0, "", "")

    def header(self, device: str) -> LuksHeader:
        assert self.formatted
        return LuksHeader(device, 2, "u-u-i-d", "", "aes-xts-plain64", 16 * MiB, 512, (), (), ())

    def status(self, name: str) -> MappingStatus:
        if not self.mapping_open:
            return MappingStatus(name, False, False, "", 0, 0, False)
        size = (self.lvs["lv_mail"] - 16 * MiB) // 512
        return MappingStatus(name, True, False, "/dev/vg0/lv_mail", 32768, size, True)

    def commands(self, word: str) -> list[tuple[str, ...]]:
        return [c for c in self.calls if word in c[:2]]

    # --- libvirt ---

    def state(self, guest: str) -> str:
        return self.guest_state

    def has_managed_save(self, guest: str) -> bool:
        return False

    def defined_xml(self, guest: str) -> str:
        return self.xml

    def define(self, xml: str) -> None:
        self.xml = xml

    # --- the rest of luksvm ---

    def service(self, name: str) -> Callable[..., object]:
        def called(*args: object) -> object:
            self.services.append(name)
            if name == "stop_guest":
                self.guest_state = "shutoff"
            if name == "lock_volume":
                self.mapping_open = False
            return [f"{name} done"] if name == "apply" else f"{name} done"

        return called


def lvm_json(kind: str, rows: list[dict[str, str]]) -> str:
    return json.dumps({"report": [{kind: rows}]})


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    source = tmp_path / "mail.qcow2"
    source.write_bytes(b"QFI\xfb")
    w = World(tmp_path / "root", source, xml=DOMAIN.format(source=source))
    (w.root / "etc/luksvm/crypttab.d").mkdir(parents=True)
    for module in (migrate, lvm, qemuimg):
        monkeypatch.setattr(module, "run", w.run)
    monkeypatch.setattr(migrate, "stream", w.stream)
    monkeypatch.setattr(cryptsetup, "read_header", w.header)
    monkeypatch.setattr(cryptsetup, "status", w.status)
    monkeypatch.setattr(keys, "run", w.test_key)
    monkeypatch.setattr(keys, "terminal", lambda: True)
    monkeypatch.setattr(keys.getpass, "getpass", w.ask)
    monkeypatch.setattr(blockdev, "settle", lambda: None)
    return w


def context(w: World, answers: list[str] | None = None) -> migrate.Context:
    w.answers = list(answers if answers is not None else [KEY.decode(), KEY.decode()])
    services = migrate.Services(
        stop_guest=w.service("stop_guest"),
        lock_volume=w.service("lock_volume"),
        adopt=w.service("adopt"),
        backup_header=w.service("backup_header"),  # type: ignore[arg-type]
        doctor=lambda root, volume, guest: f"OK   {volume} {guest}\n",
        apply=w.service("apply"),  # type: ignore[arg-type]
    )
    w.out.clear()
    return migrate.Context(str(w.root), config.load(str(w.root)), w, services, w.out.append)


REQUEST = migrate.Request("mail", "vda", "vg0", "lv_mail", "cr_mail")


def test_a_migration_runs_every_step_in_order_and_keys_go_on_stdin_only(world: World) -> None:
    ctx = context(world)
    previous = world.xml
    migrate.migrate(REQUEST, ctx)
    names = [c[0] if c[0] != "cryptsetup" and c[0] != "qemu-img" else " ".join(c[:2])
             for c in world.calls if c[0] not in ("vgs", "lvs")]  # fmt: skip
    assert names == [
        "qemu-img info",
        "lvcreate",
        "cryptsetup luksFormat",
        "cryptsetup open",
        "qemu-img convert",
        "qemu-img compare",
    ]
    assert world.lvs == {"lv_mail": DISK_SIZE + 16 * MiB}
    assert world.stdins == {"format": KEY, "open": KEY}
    assert not any(KEY.decode() in arg for call in world.calls for arg in call)
    # the same domain, that disk on the mapping
    disk = migrate.domain_disk(world.xml, "vda")
    assert (disk.type, disk.source) == ("block", "/dev/mapper/cr_mail")
    assert "52:54:00:12:34:56" in world.xml and "4dea22b3-1d52" in world.xml
    state = migrate.State.load(migrate.state_path(str(world.root), "mail", "vda"))
    assert Path(state.previous_xml_path).read_text() == previous
    assert state.done == list(migrate.STEP_NAMES) and state.finished
    # one fragment of its own, read back by luksvm's configuration
    volume = config.load(str(world.root)).volume("cr_mail")
    assert (volume.source, volume.guests, volume.key.kind) == ("/dev/vg0/lv_mail", ("mail",), "ask")
    assert world.services == [
        "ask: New passphrase for cr_mail: ",
        "ask: Repeat the passphrase for cr_mail: ",
        "apply",
        "adopt",
        "backup_header",
    ]
    out = "\n".join(world.out)
    assert "copied: 64.0 MiB of 64.0 MiB (100.0 %)" in out
    assert "doctor says about cr_mail and mail:\n  OK   cr_mail mail" in out
    assert f"Delete it when satisfied: rm -- {world.source}" in out
    assert world.source.read_bytes() == b"QFI\xfb"  # the source is never written


def test_running_it_again_after_it_finished_does_nothing(world: World) -> None:
    migrate.migrate(REQUEST, context(world))
    calls = len(world.calls)
    ctx = context(world, answers=[])
    migrate.migrate(REQUEST, ctx)
    assert len(world.calls) == calls
    assert "nothing to do" in world.out[-1]


def test_a_run_killed_during_the_copy_resumes_with_the_same_command(world: World) -> None:
    world.kill_copy_at = 50.0
    with pytest.raises(KilledDuringCopy):
        migrate.migrate(REQUEST, context(world))
    assert migrate.domain_disk(world.xml, "vda").type == "file"  # domain untouched so far
    # the host rebooted: the mapping is gone
    world.mapping_open = False
    world.kill_copy_at = None
    world.calls.clear()
    world.services.clear()
    migrate.migrate(REQUEST, context(world, answers=[KEY.decode()]))
    assert not world.commands("lvcreate") and not world.commands("luksFormat")
    assert [c[:2] for c in world.calls if c[0] in ("cryptsetup", "qemu-img")] == [
        ("qemu-img", "info"),  # the source is checked unchanged
        ("cryptsetup", "test-passphrase"),  # the key is tested before anything runs
        ("cryptsetup", "open"),
        ("qemu-img", "convert"),  # the copy starts over
        ("qemu-img", "compare"),
    ]
    # asked once, tested first
    assert world.services[0] == "ask: Enter passphrase for cr_mail (/dev/vg0/lv_mail): "
    assert migrate.domain_disk(world.xml, "vda").source == "/dev/mapper/cr_mail"


def test_a_resumed_run_compares_again_before_repointing(world: World) -> None:
    ctx = context(world)
    original = migrate._redefine

    def crash(state: migrate.State, ctx: migrate.Context) -> None:
        raise KilledDuringCopy

    migrate._redefine = crash  # type: ignore[assignment]
    try:
        with pytest.raises(KilledDuringCopy):
            migrate.migrate(REQUEST, ctx)
    finally:
        migrate._redefine = original  # type: ignore[assignment]
    world.calls.clear()
    migrate.migrate(REQUEST, context(world, answers=[]))
    assert [c[1] for c in world.calls if c[0] == "qemu-img"] == ["info", "compare"]


def test_resume_refuses_while_the_guest_runs_again(world: World) -> None:
    world.kill_copy_at = 0.0
    with pytest.raises(KilledDuringCopy):
        migrate.migrate(REQUEST, context(world))
    world.kill_copy_at = None
    world.guest_state = "running"
    with pytest.raises(LuksvmError, match="guest mail is running; it must stay shut off"):
        migrate.migrate(REQUEST, context(world))
    world.services.clear()
    migrate.migrate(REQUEST, context(world, answers=[]), shutdown=True)  # mapping still open
    assert world.services == ["stop_guest", "apply", "adopt", "backup_header"]


def test_another_request_while_one_is_recorded_is_refused(world: World) -> None:
    world.kill_copy_at = 0.0
    with pytest.raises(KilledDuringCopy):
        migrate.migrate(REQUEST, context(world))
    other = migrate.Request("mail", "vda", "vg0", "lv_other", "cr_mail")
    with pytest.raises(UsageError, match="run that same command again to resume it"):
        migrate.migrate(other, context(world))


def test_a_differing_copy_stops_before_the_domain_changes(world: World) -> None:
    world.copy_differs = True
    with pytest.raises(LuksvmError, match=r"differs from .* at byte 4,096; the domain still uses"):
        migrate.migrate(REQUEST, context(world))
    assert migrate.domain_disk(world.xml, "vda").type == "file"
    assert not os.path.exists(migrate.fragment_path(str(world.root), "cr_mail"))


def test_dry_run_changes_nothing(world: World) -> None:
    world.guest_state = "running"
    ctx = context(world, answers=[])
    migrate.migrate(REQUEST, ctx, shutdown=True, dry_run=True)
    assert {c[0] for c in world.calls} <= {"vgs", "lvs", "qemu-img"}
    assert not os.path.exists(migrate.state_dir(str(world.root)))
    out = "\n".join(world.out)
    assert " 0. stop guest mail (it is running)" in out
    assert "lvcreate --yes --size 83886080b --name lv_mail vg0" in out


def test_preconditions_are_all_named_at_once(world: World) -> None:
    world.guest_state = "running"
    world.lvs["lv_mail"] = MiB
    with pytest.raises(LuksvmError) as caught:
        migrate.migrate(REQUEST, context(world))
    assert "guest mail is running" in str(caught.value)
    assert "LV vg0/lv_mail exists already" in str(caught.value)
    assert not os.path.exists(migrate.state_dir(str(world.root)))


def test_rollback_restores_the_previous_definition_exactly(world: World) -> None:
    previous = world.xml
    migrate.migrate(REQUEST, context(world))
    world.services.clear()
    ctx = context(world, answers=[])
    migrate.rollback("mail", None, ctx)
    assert world.xml == previous
    assert world.services == ["lock_volume", "apply"]
    assert not os.path.exists(migrate.fragment_path(str(world.root), "cr_mail"))
    assert migrate.states_of(str(world.root), "mail") == []
    assert "lvremove vg0/lv_mail" in world.out[-1]
    assert "lv_mail" in world.lvs  # never deleted
    with pytest.raises(UsageError, match="no migration of mail is recorded"):
        migrate.rollback("mail", None, context(world))


def test_rollback_refuses_a_running_guest_and_later_edits(world: World) -> None:
    migrate.migrate(REQUEST, context(world))
    world.guest_state = "running"
    with pytest.raises(LuksvmError, match="guest mail is running; shut it off first"):
        migrate.rollback("mail", None, context(world))
    world.guest_state = "shutoff"
    world.xml = world.xml.replace("<devices>", "<vcpu>4</vcpu><devices>")
    with pytest.raises(LuksvmError, match="definition changed after migrate defined it"):
        migrate.rollback("mail", None, context(world))
    assert world.services.count("lock_volume") == 0


def test_rollback_of_an_interrupted_run_closes_the_mapping(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.kill_copy_at = 25.0
    with pytest.raises(KilledDuringCopy):
        migrate.migrate(REQUEST, context(world))
    previous = world.xml
    closed: list[str] = []
    monkeypatch.setattr(cryptsetup, "close_mapping", closed.append)
    ctx = context(world, answers=[])
    migrate.rollback("mail", "vda", ctx, dry_run=True)
    assert closed == [] and migrate.states_of(str(world.root), "mail")
    migrate.rollback("mail", "vda", ctx)
    assert closed == ["cr_mail"]
    assert world.xml == previous and "apply" not in world.services


def test_config_must_be_valid_before_anything_is_written(world: World) -> None:
    bad: Volume = migrate.fragment_volume(REQUEST)
    assert bad.name == "cr_mail"
    (world.root / "etc/luksvm/crypttab.d/10-x.conf").write_text("cr_mail /dev/a/b - luks\n")
    ctx = context(world)
    assert isinstance(ctx.config, Config)
    with pytest.raises(LuksvmError, match="mapping name cr_mail is configured already"):
        migrate.migrate(REQUEST, ctx)


def test_without_a_terminal_it_refuses_naming_the_step_before_the_lv_is_created(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys, "terminal", lambda: False)
    with pytest.raises(LuksvmError) as caught:
        migrate.migrate(REQUEST, context(world, answers=[]))
    assert caught.value.message.startswith("step format (")
    assert (
        "needs the key of cr_mail: it is to be asked as a passphrase, and there is no terminal"
        in (caught.value.message)
    )
    assert caught.value.fix.startswith("give a keyfile or keyring: key instead (--key)")
    assert not world.commands("lvcreate") and not world.formatted


def test_a_keyfile_others_may_read_is_refused_as_unlock_refuses_it(world: World) -> None:
    path = world.root / "etc/luksvm/keys/mail.key"
    path.parent.mkdir(parents=True)
    path.write_bytes(KEY)
    path.chmod(0o644)
    request = dataclasses.replace(REQUEST, key="/etc/luksvm/keys/mail.key")
    with pytest.raises(LuksvmError) as caught:
        migrate.migrate(request, context(world, answers=[]))
    assert caught.value.fix == f"chmod 0400 {path}"
    assert not world.commands("lvcreate")
    path.chmod(0o400)
    migrate.migrate(request, context(world, answers=[]))
    assert world.stdins == {"format": KEY, "open": KEY}


def test_the_start_hint_names_the_systemd_escaped_unit(world: World) -> None:
    migrate.migrate(dataclasses.replace(REQUEST, guest="mail-1"), context(world))
    assert "Start the guest: systemctl start 'luksvm-guest@mail\\x2d1.service'" in "\n".join(
        world.out
    )

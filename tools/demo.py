"""`make demo`: luksvm's main job on a real (virtual) host, told from that host's journal.

    make demo                       # as root on Debian 12: installs what it needs, then runs this
    .venv/bin/python -m tools.demo  # the same, once the tools are there

It boots the seed host of the e2e tier (tests/e2e: a Debian VM under QEMU with VG volgrp4, two
LUKS volumes cr_imap_encr and cr_web, and libvirt guests mail and web on them), builds the VM image
first when it is not cached (a few minutes), and then:

1. configures luksvm on a copy of that host (both volumes with their keyfiles, each for its guest;
   stop_timeout 5 s, since the guests have no OS and ignore the ACPI shutdown) and `luksvm apply`;
2. reboots it with luksvm in charge, backs up the LUKS headers, and powers it off;
3. boots once more to read the journal of that boot and its shutdown back,

and prints what happened, with times since the kernel of boot 2 started: volumes unlocked →
libvirt up → guests started → header backup → shutdown: guests stopped → guest VG off → volumes
closed. It exits 1 when a step of that story is missing from the journal.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from luksvm.journal import MESSAGE_IDS
from luksvm.units import LIBVIRT_DAEMONS
from tests.e2e.journal import Entry

REPO = Path(__file__).resolve().parents[1]
WORKDIR = REPO / "build" / "demo"

# systemd's own catalog ids (systemd/sd-messages.h)
SD_STARTUP_FINISHED = "b07a249cd024414a82dd00cd181378ff"
SD_SHUTDOWN = "98268866d1d54a499c4e98921d93bc40"  # logind: "System is powering down."
POWER_TARGETS = ("poweroff.target", "reboot.target", "halt.target")
VG_OFF = re.compile(r"deactivating guest VG (\S+)")
# lvm2's blk-availability.service at shutdown: blkdeactivate takes down what nothing holds, which
# may be a guest VG before luksvm's lock gets to it (luksvm then has nothing left to deactivate).
BLKDEACTIVATE_VG_OFF = re.compile(r"\[LVM\]: deactivating Volume Group (\S+?)\.\.\. done")
KIND_OF = {message_id: kind for kind, message_id in MESSAGE_IDS.items()}

VOLUMES = {"cr_imap_encr": "mail", "cr_web": "web"}  # the seed host's volumes and their guests
GUEST_VGS = ("vgmail",)  # inside cr_imap_encr; the host's LVM activates it at boot

SETUP = """\
install -d /etc/luksvm/crypttab.d
cat > /etc/luksvm/crypttab.d/10-demo.conf <<'CONF'
# name        source                   key                        options
cr_imap_encr  /dev/volgrp4/lvimap_hd0  /etc/luksvm/keys/imap.key  luks,discard,x-luksvm.guest=mail
cr_web        /dev/volgrp4/lvweb_hd0   /etc/luksvm/keys/web.key   luks,discard,x-luksvm.guest=web
CONF
printf '[guests]\\nstop_timeout = 5s\\n' > /etc/luksvm/luksvm.conf
luksvm config check
luksvm apply
systemctl enable luksvm.target luksvm-header-backup.timer
"""

RUNNING = """\
luksvm status > status.txt
systemctl start luksvm-header-backup.service
"""


# --- the story (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    seconds: float  # since the kernel of this boot started
    what: str
    detail: str = ""


@dataclass(frozen=True)
class Story:
    boot: tuple[Event, ...]  # until the system is up
    running: tuple[Event, ...]
    shutdown: tuple[Event, ...]
    missing: tuple[str, ...]  # steps of the main job the journal does not show


def _detail(entry: Entry, *names: str) -> str:
    """luksvm's message without the name it starts with ("guest mail shut down after 3 s" →
    "shut down after 3 s")."""
    text = entry.message
    for name in names:
        for prefix in (f"guest {name} ", f"guest {name!r} ", f"{name}: "):
            if name and text.startswith(prefix):
                return text[len(prefix) :]
    return text


def event_of(entry: Entry, guest_vgs: Sequence[str] = GUEST_VGS) -> Event | None:
    """The step of the story `entry` tells, or None for everything else."""
    seconds = entry.monotonic / 1e6
    kind = KIND_OF.get(entry.get("MESSAGE_ID"))
    volume, guest = entry.get("LUKSVM_VOLUME"), entry.get("LUKSVM_GUEST")
    if entry.identifier == "luksvm":
        says = {
            "unlocked": (f"{volume} unlocked", entry.unit),
            "locked": (f"{volume} closed", entry.unit),
            "guest-started": (f"guest {guest} started", _detail(entry, guest)),
            "guest-stopped": (f"guest {guest} stopped", _detail(entry, guest)),
            "guest-timeout": (f"guest {guest}: stop timeout", _detail(entry, guest)),
            "guest-start-refused": (f"guest {guest} not started", _detail(entry, guest)),
            "header-backup": (f"header backup of {volume}", entry.message.rsplit("/", 1)[-1]),
        }
        if kind in says:
            what, detail = says[kind]
            return Event(seconds, what, detail)
        if kind is not None:  # a key event this story has no words for yet
            return Event(seconds, kind, entry.message)
        deactivating = VG_OFF.search(entry.message)
        if deactivating:
            return Event(seconds, f"guest VG {deactivating[1]} off", f"luksvm, inside {volume}")
        if entry.get("PRIORITY") in ("0", "1", "2", "3"):
            return Event(seconds, "luksvm error", entry.message)
        if entry.get("_TRANSPORT") == "stdout" and entry.message.startswith("luksvm: "):
            # what a command in a unit printed on stderr: its error or warning
            return Event(seconds, entry.unit or "luksvm", entry.message[len("luksvm: ") :])
        return None
    blkdeactivate = BLKDEACTIVATE_VG_OFF.search(entry.message)
    if entry.identifier == "blkdeactivate" and blkdeactivate and blkdeactivate[1] in guest_vgs:
        return Event(
            seconds, f"guest VG {blkdeactivate[1]} off", "blkdeactivate (blk-availability.service)"
        )
    message_id = entry.get("MESSAGE_ID")
    if message_id == SD_STARTUP_FINISHED and entry.identifier == "systemd":
        return Event(seconds, "system up", entry.message)
    if message_id == SD_SHUTDOWN:
        return Event(seconds, "host shutdown begins", entry.message)
    done = entry.get("JOB_TYPE") == "start" and entry.get("JOB_RESULT") == "done"
    if done and entry.about in LIBVIRT_DAEMONS:
        return Event(seconds, "libvirt up", entry.about)
    if done and entry.about in POWER_TARGETS:
        return Event(seconds, "host powers off", entry.about)
    return None


def tell(
    entries: Iterable[Entry],
    boot_id: str,
    volumes: Mapping[str, str] = VOLUMES,
    guest_vgs: Sequence[str] = GUEST_VGS,
) -> Story:
    """The story of one boot and its shutdown. What must be in it: `volumes` (each mapped to its
    guest) unlocked and closed, their guests started and stopped, `guest_vgs` deactivated."""
    ordered = sorted((e for e in entries if e.boot_id == boot_id), key=lambda e: e.monotonic)
    events: list[Event] = []
    for entry in ordered:
        event = event_of(entry, guest_vgs)
        if event is None:
            continue
        if event.what == "libvirt up" and any(e.what == "libvirt up" for e in events):
            continue  # the first start; libvirtd exits when idle and is socket-activated again
        events.append(event)
    up = next((e.seconds for e in events if e.what == "system up"), None)
    down = next((e.seconds for e in events if e.what == "host shutdown begins"), None)
    boot = tuple(e for e in events if up is None or e.seconds <= up)
    shutdown = tuple(e for e in events if down is not None and e.seconds >= down)
    running = tuple(e for e in events if e not in boot and e not in shutdown)
    wanted = [
        *(f"{v} unlocked" for v in volumes),
        "libvirt up",
        *(f"guest {g} started" for g in volumes.values()),
        "host shutdown begins",
        *(f"guest {g} stopped" for g in volumes.values()),
        *(f"guest VG {vg} off" for vg in guest_vgs),
        *(f"{v} closed" for v in volumes),
    ]
    seen = {e.what for e in events}
    return Story(boot, running, shutdown, tuple(w for w in wanted if w not in seen))


def format_story(story: Story) -> list[str]:
    sections = (
        ("boot", story.boot),
        ("running", story.running),
        ("host shutdown", story.shutdown),
    )
    events = [e for _, part in sections for e in part]
    width = max((len(e.what) for e in events), default=0)
    lines = []
    for title, part in sections:
        if not part:
            continue
        lines.append(title)
        for event in part:
            line = f"  {event.seconds:7.1f} s  {event.what:<{width}}  {event.detail}"
            lines.append(line.rstrip())
    lines += [f"missing from the journal: {what}" for what in story.missing]
    return lines


# --- the run --------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] = ()) -> int:
    # The harness only when running: the story above stays importable without QEMU around.
    from tests.e2e import settings
    from tests.e2e.image import ensure_image
    from tests.e2e.project import build_wheel
    from tests.e2e.seed import SeedHost

    started = time.monotonic()
    if WORKDIR.exists():
        shutil.rmtree(WORKDIR)
    WORKDIR.mkdir(parents=True)
    say(f"VM image (cache {settings.cache_dir()}; a first build takes a few minutes)")
    image, built = ensure_image(settings.cache_dir())
    say(f"image {'built' if built else 'cached'}: {image.dir}")
    wheel = build_wheel(WORKDIR / "wheel")
    say("seed host: one boot builds VG volgrp4, LUKS volumes, guest VG, libvirt guests")
    seed = SeedHost.build(image, wheel, WORKDIR / "seed")
    host = seed.clone(WORKDIR / "host", name="host")
    try:
        say(f"seed host ready in {seed.seconds:.0f} s; boot 1: configure luksvm, luksvm apply")
        host.boot(SETUP, timeout=600)
        say("boot 2: luksvm in charge; header backup; power off")
        running = host.boot(RUNNING, timeout=600)
        say("boot 3: read the journal of boot 2 and its shutdown back")
        journal = host.collect(timeout=600).journal
    finally:
        host.discard()
        seed.machine.discard()
    story = tell(journal, running.boot_id or "")
    print(
        "luksvm on the e2e seed host (VG volgrp4; LUKS volumes cr_imap_encr, cr_web; guests mail,"
        " web),\nboot 2 and its shutdown as the journal tells it, seconds since its kernel"
        " started\n(software emulation: a real host is several times faster)\n"
    )
    print("\n".join(format_story(story)))
    print("\nluksvm status while it ran:\n" + running.text("status.txt"))
    say(f"done in {time.monotonic() - started:.0f} s; logs and journals in {WORKDIR}")
    return 1 if story.missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

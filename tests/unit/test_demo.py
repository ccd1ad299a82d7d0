"""`make demo`'s story, built from a journal captured in the VM (no VM here).

data/demo-journal.jsonl: `journalctl -o json` of a `make demo` run on a busy 2-core machine (boot 2
of the seed host clone and its shutdown, plus other boots' and units' lines that must not count),
cut to the fields the story reads. In that run the create of guest web took longer than luksvm's
30 s libvirt call deadline then, so web's unit failed: the story must show that, and say that web's
start and stop are missing.
"""

from __future__ import annotations

from pathlib import Path

from tests.e2e.journal import Journal
from tools.demo import Event, format_story, tell

DATA = Path(__file__).parent / "data" / "demo-journal.jsonl"
BOOT = "bd5bedcbd3c6470583f543495f08f517"


def test_story_of_a_captured_boot_and_shutdown() -> None:
    story = tell(Journal.load(DATA), BOOT)

    def told(events: tuple[Event, ...]) -> list[tuple[float, str]]:
        return [(round(event.seconds, 1), event.what) for event in events]

    assert told(story.boot) == [
        (149.7, "cr_web unlocked"),
        (153.7, "cr_imap_encr unlocked"),
        (160.4, "libvirt up"),
        (211.2, "guest mail started"),
        (216.2, "luksvm-guest@web.service"),
        (223.3, "system up"),
    ]
    assert told(story.running) == [
        (273.4, "header backup of cr_imap_encr"),
        (292.4, "header backup of cr_web"),
    ]
    assert told(story.shutdown) == [
        (311.0, "host shutdown begins"),
        (353.7, "guest VG vgmail off"),
        (358.5, "guest mail: stop timeout"),
        (365.2, "guest mail stopped"),
        (433.9, "cr_web closed"),
        (436.3, "cr_imap_encr closed"),
        (436.6, "host powers off"),
    ]
    assert story.missing == ("guest web started", "guest web stopped")

    lines = format_story(story)
    assert lines[:2] == [
        "boot",
        "    149.7 s  cr_web unlocked                luksvm-unlock@cr_web.service",
    ]
    assert lines[-2:] == [
        "missing from the journal: guest web started",
        "missing from the journal: guest web stopped",
    ]
    assert "running" in lines and "host shutdown" in lines


def test_story_details_come_from_the_entries() -> None:
    story = tell(Journal.load(DATA), BOOT)
    details = {event.what: event.detail for event in (*story.boot, *story.running, *story.shutdown)}
    assert details["cr_web unlocked"] == "luksvm-unlock@cr_web.service"
    assert details["libvirt up"] == "libvirtd.service"
    assert details["guest mail started"] == "running after 25.4 s"
    assert details["luksvm-guest@web.service"] == "libvirt did not answer start web within 30 s"
    assert details["header backup of cr_web"].endswith(
        "_c97adc66-ad64-4b7a-8421-2487cb98113c.luksheader"
    )
    assert details["guest VG vgmail off"] == "blkdeactivate (blk-availability.service)"
    assert details["guest mail stopped"] == "destroyed after 22.4 s"
    assert details["host powers off"] == "poweroff.target"


def test_only_the_given_boot_counts() -> None:
    journal = Journal.load(DATA)
    others = [b for b in journal.boot_ids if b != BOOT]
    assert others, "the capture should hold lines of other boots"
    story = tell(journal, others[0])
    assert not story.running and not story.shutdown
    assert "cr_imap_encr unlocked" in story.missing


def test_a_complete_story_misses_nothing() -> None:
    # the same capture, asking only for what it shows: mail on cr_imap_encr
    story = tell(Journal.load(DATA), BOOT, volumes={"cr_imap_encr": "mail"})
    assert story.missing == ()

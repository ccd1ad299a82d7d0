"""`luksvm trim` end to end against libvirt's test driver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from luksvm.cli import main
from tests.conftest import write_config

NODE = """<node><domain type='test'><name>mail</name><memory>65536</memory>
<os><type>hvm</type></os><devices>
<disk type='block' device='disk'><driver name='qemu' type='raw'{discard}/>
<source dev='/dev/mapper/cr_imap_encr'/><target dev='vda' bus='virtio'/></disk>
</devices></domain></node>"""


def run_trim(tmp_path: Path, discard: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    node = tmp_path / "node.xml"
    node.write_text(NODE.format(discard=discard))
    write_config(
        tmp_path,
        {"10.conf": "cr_imap_encr /dev/vg/x /etc/luksvm/keys/k luks,discard,x-luksvm.guest=mail\n"},
        f"[libvirt]\nuri = test://{node}\n",
    )
    code = main(["--root", str(tmp_path), "trim", "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_trim_reports_a_domain_disk_without_discard_as_the_break(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = run_trim(tmp_path, "", capsys)
    assert code == 1
    (guest,) = report["guests"]
    assert guest["guest"] == "mail"
    assert guest["trim"] == "trimmed"  # the test driver answers fsTrim itself
    (disk,) = guest["disks"]
    assert disk["volume"] == "cr_imap_encr"
    assert disk["broken"] == "domain disk"
    links = {link["link"]: link for link in disk["links"]}
    assert "discard='unmap'" in links["domain disk"]["fix"]
    assert "fstrim.timer" in report["host"]


def test_with_discard_unmap_the_domain_link_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, report = run_trim(tmp_path, " discard='unmap'", capsys)
    (disk,) = report["guests"][0]["disks"]
    links = {link["link"]: link for link in disk["links"]}
    assert links["domain disk"]["ok"] is True
    assert disk["broken"] != "domain disk"

"""Fakes for doctor's unit tests: a command table standing in for run.run (answers are real outputs
captured from the tools, in fixtures/doctor/), and a Host whose open mappings are given."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

import pytest

from luksvm import cryptsetup, lvm, systemctl
from luksvm.config import Volume
from luksvm.doctor import Host
from luksvm.run import CommandError, Result

FIXTURES = Path(__file__).parent / "fixtures" / "doctor"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


class Commands:
    """argv → (exit code, stdout); an argv nobody set up fails the test, naming it."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, ...], tuple[int, str]] = {}
        self.calls: list[tuple[str, ...]] = []

    def set(self, argv: Sequence[str], stdout: str = "", returncode: int = 0) -> None:
        self.answers[tuple(argv)] = (returncode, stdout)

    def run(
        self, argv: Sequence[str], *, timeout: float, check: bool = True, **_: object
    ) -> Result:
        argv = tuple(argv)
        self.calls.append(argv)
        if argv not in self.answers:
            pytest.fail(f"unexpected command: {shlex.join(argv)}")
        returncode, stdout = self.answers[argv]
        if check and returncode != 0:
            raise CommandError(argv, returncode, "", f"exit status {returncode}")
        return Result(argv, returncode, stdout, "")

    # the commands doctor runs, by what they are about

    def luks(self, device: str, dump: str | None, json_metadata: str | None = None) -> None:
        """device's header from fixtures (None: not LUKS)."""
        self.set(
            ["cryptsetup", "luksDump", device], fixture(dump) if dump else "", 0 if dump else 1
        )
        if json_metadata:
            self.set(
                ["cryptsetup", "luksDump", "--dump-json-metadata", device], fixture(json_metadata)
            )

    def lvm(
        self,
        full: str = "lvmconfig-full-2.03.16.txt",
        current: str = "",
        version: str = "  LVM version:     2.03.16(2) (2022-05-18)\n",
        system_dir_env: bool = False,
    ) -> None:
        self.set(["lvmconfig", "--typeconfig", "full"], fixture(full))
        self.set(["lvmconfig", "--typeconfig", "current"], fixture(current) if current else "")
        self.set(["lvm", "version"], version)

    def pvs(self, rows: list[dict[str, str]], devices: Sequence[str] = ()) -> None:
        args: list[str] = []
        for device in devices:
            args += ["--devices", device]
        self.set(
            [
                "pvs",
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "pv_name,vg_name,pv_size,dev_size,pe_start",
                *args,
            ],
            lvm_report("pv", rows),
        )

    def vg_layout(self, vg: str, device: str, lvs: dict[str, bool]) -> None:
        """`vg` with one PV, `device`, holding the LVs named in `lvs` ({name: active})."""
        extent = 4 * 1024 * 1024
        segments = [
            {
                "pv_name": device,
                "vg_name": vg,
                "vg_extent_size": str(extent),
                "dev_size": str(64 * 1024 * 1024),
                "pe_start": "1048576",
                "pv_pe_count": "15",
                "pv_mda_count": "1",
                "pvseg_start": str(n),
                "pvseg_size": "1",
                "lv_name": name,
                "seg_start_pe": "0",
            }
            for n, name in enumerate(lvs)
        ]
        lv_rows = [
            {
                "vg_name": vg,
                "lv_name": name,
                "lv_attr": "-wi-a-----" if active else "-wi-------",
                "lv_size": str(extent),
                "segtype": "linear",
                "lv_layout": "linear",
                "origin": "",
                "pool_lv": "",
                "lv_active": "active" if active else "",
                "lv_dm_path": f"/dev/mapper/{vg}-{name}",
            }
            for name, active in lvs.items()
        ]
        common = ["--reportformat", "json", "--units", "b", "--nosuffix", "-o"]
        self.set(
            [
                "pvs",
                *common,
                ",".join(lvm.PV_SEGMENT_FIELDS),
                "--devices",
                device,
                "--segments",
                "--select",
                f"vg_name={vg}",
            ],
            lvm_report("pv", segments),
        )
        self.set(
            ["lvs", *common, ",".join(lvm.LV_FIELDS), "--devices", device, "-a", "--segments", vg],
            lvm_report("lv", lv_rows),
        )

    def unit_files(self, root: str, text: str) -> None:
        from luksvm.doctor import UNIT_FILE_PATTERNS

        self.set(
            [
                "systemctl",
                f"--root={root}",
                "list-unit-files",
                "--no-pager",
                "--output=json",
                *UNIT_FILE_PATTERNS,
            ],
            text,
        )


def lvm_report(kind: str, rows: list[dict[str, str]]) -> str:
    """The JSON document `pvs`/`lvs --reportformat json` prints (LVM 2.03)."""
    import json

    return json.dumps({"report": [{kind: rows}]}, indent=2)


def pv_row(name: str, vg: str) -> dict[str, str]:
    size = str(64 * 1024 * 1024)
    return {
        "pv_name": name,
        "vg_name": vg,
        "pv_size": size,
        "dev_size": size,
        "pe_start": "1048576",
    }


@pytest.fixture(name="commands")
def commands_fixture(monkeypatch: pytest.MonkeyPatch) -> Commands:
    """Import commands_fixture into a test module to get the `commands` fixture."""
    table = Commands()
    for module in (lvm, cryptsetup, systemctl):
        monkeypatch.setattr(module, "run", table.run)
    return table


class FakeHost(Host):
    """A Host whose open mappings and their /dev names are given instead of looked up."""

    def __init__(self, root: str, *, open_names: dict[str, list[str]] | None = None, **kw: object):
        super().__init__(root, dev=str(Path(root) / "dev"), sys=str(Path(root) / "sys"), **kw)  # type: ignore[arg-type]
        self.open_names = open_names or {}

    def mapping_path(self, volume: Volume) -> str:
        return volume.mapper_path

    def is_open(self, volume: Volume) -> bool:
        return volume.name in self.open_names

    def mapping_names(self, volume: Volume) -> list[str]:
        return self.open_names.get(volume.name) or super().mapping_names(volume)

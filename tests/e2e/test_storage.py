"""Storage on the seed host: LUKS open, the guest's VG inside, close in the right order."""

from __future__ import annotations

import pytest

from .vm import Machine, note, scenario

pytestmark = pytest.mark.e2e


def test_open_nested_vg_and_close_in_order(host: Machine) -> None:
    result = host.boot(scenario("storage-smoke.sh"))

    pvs = result.json("pvs.json")["report"][0]["pv"]
    assert {"pv_name": "/dev/mapper/cr_imap_encr", "vg_name": "vgmail"} in pvs
    assert result.text("guest-fs-label") == "mailroot"
    assert result.steps["close-while-guest-vg-active"].rc != 0
    assert "in use" in result.text("close-while-guest-vg-active.err")
    assert result.text("crypt-after.txt") == ""  # no crypt mapping left

    timings = ", ".join(f"{step.name} {step.ms} ms" for step in result.steps.values())
    note("storage smoke steps", timings)

"""The alerting rules the package ships (packaging/prometheus/luksvm.rules.yml): promtool checks
them and runs their unit tests (tests/integration/prometheus/luksvm.rules.test.yml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "packaging/prometheus/luksvm.rules.yml"
TESTS = Path(__file__).resolve().parent / "prometheus"


def promtool_run(promtool: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *argv], cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )


def test_rules_pass_promtool_check(promtool: str) -> None:
    result = promtool_run(promtool, "check", "rules", str(RULES), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_rules_unit_tests_pass(promtool: str) -> None:
    result = promtool_run(promtool, "test", "rules", "luksvm.rules.test.yml", cwd=TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_unit_tests_can_fail(tmp_path: Path, promtool: str) -> None:
    """The tests above can fail: with the destroyed-guest rule's action changed, its test fails."""
    rules = tmp_path / "packaging/prometheus/luksvm.rules.yml"
    rules.parent.mkdir(parents=True)
    text = RULES.read_text()
    rules.write_text(text.replace('{action="destroyed"} == 1', '{action="saved"} == 1'))
    tests = tmp_path / "tests/integration/prometheus"
    tests.mkdir(parents=True)
    shutil.copy(TESTS / "luksvm.rules.test.yml", tests)
    result = promtool_run(promtool, "test", "rules", "luksvm.rules.test.yml", cwd=tests)
    assert result.returncode != 0
    assert "LuksvmGuestDestroyedAtShutdown" in result.stdout + result.stderr


def test_every_luksvm_metric_the_rules_use_is_one_metrics_writes(tmp_path: Path) -> None:
    import re

    from luksvm import metrics

    used = set(re.findall(r"\bluksvm_[a-z_]+\b", RULES.read_text())) - {"luksvm_prom"}
    written = {family.name for family in metrics.collect(str(tmp_path))}
    assert used and used <= written, sorted(used - written)

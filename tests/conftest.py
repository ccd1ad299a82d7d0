from __future__ import annotations

import os
from pathlib import Path

import pytest

SEED_CRYPTTAB = """\
# name       source                   key                        options
cr_imap_encr /dev/volgrp4/lvimap_hd0  /etc/luksvm/keys/imap.key  luks,discard,x-luksvm.guest=mail
cr_web       /dev/volgrp4/lvweb_hd0   /etc/luksvm/keys/web.key   luks,discard,x-luksvm.guest=web
"""

# The seed plus what a real host adds: a volume unlocked by hand over SSH (noauto, passphrase)
# for a guest that also uses a seed volume, two passphrase volumes that boot unlocks one after
# the other, a keyring: key, and per-guest settings.
MIXED_CRYPTTAB = """\
cr-web-data /dev/volgrp4/lvweb_hd1 - luks,discard,noauto,x-luksvm.guest=web
cr_scratch UUID=0A1B2C3D-1111-2222-3333-444455556666 none luks,x-systemd.device-timeout=2min
cr_files /dev/disk/by-id/nvme-SSD_980_1TB-part3 keyring:luksvm/cr_files \
luks,_netdev,x-luksvm.guest=files,x-luksvm.guest=backup
"""
MIXED_SETTINGS = """\
[guests]
stop_timeout = 2min
[guest:mail]
order = 1
on_timeout = managedsave
[guest:files]
order = 2
stop_timeout = 10min
on_timeout = fail
[keys]
keyring_backend = keyrings.alt.file.PlaintextKeyring
"""


def write_config(root: Path, fragments: dict[str, str], settings: str | None = None) -> Path:
    """A config tree under ROOT: crypttab.d fragments by file name, and luksvm.conf."""
    directory = root / "etc/luksvm/crypttab.d"
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in fragments.items():
        (directory / name).write_text(text)
    if settings is not None:
        (root / "etc/luksvm/luksvm.conf").write_text(settings)
    return root


@pytest.fixture
def seed_root(tmp_path: Path) -> Path:
    return write_config(tmp_path, {"10-seed.conf": SEED_CRYPTTAB})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tier markers follow the directory, so a test cannot end up in the wrong tier.
    for item in items:
        path = str(item.path)
        for tier in ("integration", "e2e"):
            if f"{os.sep}tests{os.sep}{tier}{os.sep}" in path:
                item.add_marker(getattr(pytest.mark, tier))

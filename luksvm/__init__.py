"""luksvm: KVM/libvirt guests on LUKS-encrypted raw LVM volumes, unlocked and shut down safely."""

from __future__ import annotations

__version__ = "0.1.0"

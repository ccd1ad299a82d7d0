"""The e2e tier boots the image's kernel as PVH (vm.boot_kernel): the bzImage's payload taken out
with the real xz and zstd codecs, the PVH note found or not, and the bzImage kept otherwise."""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e import vm

ELF_HEADER = 64
PROGRAM_HEADER = 56


def kernel_elf(note_type: int) -> bytes:
    """An ELF64 file whose one PT_NOTE segment holds a "Xen" note of `note_type`."""
    note = struct.pack("<III", 4, 4, note_type) + b"Xen\x00" + b"\x00\x10\x00\x01"
    ident = b"\x7fELF\x02\x01\x01".ljust(16, b"\x00")
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, 0, ELF_HEADER, 0, 0, ELF_HEADER, PROGRAM_HEADER, 1, 0, 0, 0
    )
    notes_at = ELF_HEADER + PROGRAM_HEADER
    segment = struct.pack("<IIQQQQQQ", 4, 4, notes_at, 0, 0, len(note), len(note), 4)
    return header + segment + note + b"\x90" * 4096


def bzimage(payload: bytes, uncompressed: int, protocol: int = 0x20F) -> bytes:
    """A bzImage as the boot protocol lays it out: one setup sector after the boot sector, the
    setup header's payload_offset/_length, the payload plus its 4-byte uncompressed size."""
    setup_sects = 1
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, protocol)
    body = b"\xcc" * 300  # the decompressor's code before the payload
    appended = payload + struct.pack("<I", uncompressed)
    struct.pack_into("<II", image, 0x248, len(body), len(appended))
    return bytes(image) + body + appended + b"\x00" * 16


def test_an_xz_payload_with_a_pvh_note_is_written_once_next_to_the_bzimage(tmp_path: Path) -> None:
    elf = kernel_elf(vm.XEN_ELFNOTE_PHYS32_ENTRY)
    path = tmp_path / "vmlinuz"
    path.write_bytes(bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ), len(elf)))
    booted = vm.boot_kernel(path)
    assert booted == tmp_path / vm.PVH_KERNEL
    assert booted.read_bytes() == elf
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([vm.PVH_KERNEL, "vmlinuz"])


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is not installed")
def test_a_zstd_payload_is_read_with_the_zstd_tool(tmp_path: Path) -> None:
    elf = kernel_elf(vm.XEN_ELFNOTE_PHYS32_ENTRY)
    packed = subprocess.run(["zstd", "-q", "-c"], input=elf, capture_output=True, check=True)
    path = tmp_path / "vmlinuz"
    path.write_bytes(bzimage(packed.stdout, len(elf)))
    assert vm.boot_kernel(path).read_bytes() == elf


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(
            lambda: bzimage(lzma.compress(kernel_elf(5), format=lzma.FORMAT_XZ), 1),
            id="no-PVH-note",
        ),
        pytest.param(
            lambda: bzimage(lzma.compress(kernel_elf(18), format=lzma.FORMAT_XZ), 1, 0x207),
            id="boot-protocol-too-old",
        ),
        pytest.param(lambda: bzimage(b"\xfd7zXZ\x00 broken", 1), id="broken-xz"),
        pytest.param(lambda: bzimage(b"\x1f\x8b\x08 gzip", 1), id="another-codec"),
        pytest.param(lambda: b"MZ not a bzImage" * 100, id="no-setup-header"),
    ],
)
def test_any_other_kernel_boots_as_the_bzimage_and_nothing_is_written(
    tmp_path: Path, blob: Callable[[], bytes]
) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(blob())
    assert vm.boot_kernel(path) == path
    assert [p.name for p in tmp_path.iterdir()] == ["vmlinuz"]

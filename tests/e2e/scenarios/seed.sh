# The seed host: what a luksvm user's KVM host looks like before luksvm is configured.
#   disk "pv0" → PV of VG volgrp4 → LVs lvimap_hd0, lvweb_hd0 → LUKS2 each (keyfiles in
#   /etc/luksvm/keys, 0400) → inside cr_imap_encr the guest's own VG vgmail (PV on the whole disk,
#   as a guest installer makes it: this is what leaks into the host's LVM); inside cr_web a
#   partition table (a guest that does not leak). libvirt domains mail and web use the mappings.
# Built once per test session (seed.py); every scenario boots a copy-on-write clone of it.
# Everything ends closed and deactivated; no /etc/crypttab, no luksvm configuration.

# The project the way a user installs it.
step install-wheel pip install --no-deps --no-index --break-system-packages \
    --root-user-action=ignore --disable-pip-version-check "$E2E_IN"/luksvm-*.whl
python3 -c 'import luksvm, sys; sys.stdout.write(luksvm.__version__)' > luksvm-version
command -v luksvm

# LUKS with a fast KDF: the seed is about layout, not about key stretching.
fast_kdf=(--type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000)

step host-vg sh -c 'pvcreate -q /dev/disk/by-id/virtio-pv0 && vgcreate -q volgrp4 /dev/disk/by-id/virtio-pv0'
step host-lvs sh -c 'lvcreate -q -y -n lvimap_hd0 -L 256m volgrp4 && lvcreate -q -y -n lvweb_hd0 -L 128m volgrp4'

install -d -m 0700 /etc/luksvm /etc/luksvm/keys
for name in imap web; do
    head -c 64 /dev/urandom > /etc/luksvm/keys/$name.key
    chmod 0400 /etc/luksvm/keys/$name.key
    step "luksformat-$name" cryptsetup luksFormat -q "${fast_kdf[@]}" \
        --key-file /etc/luksvm/keys/$name.key /dev/volgrp4/lv${name}_hd0
done

# Inside cr_imap_encr: what the mail guest's installer made (PV on the whole disk, VG, LV, ext4).
step open-imap cryptsetup open --key-file /etc/luksvm/keys/imap.key /dev/volgrp4/lvimap_hd0 cr_imap_encr
step guest-vg sh -c 'pvcreate -q /dev/mapper/cr_imap_encr && vgcreate -q vgmail /dev/mapper/cr_imap_encr'
step guest-lv lvcreate -q -y -n root -L 128m vgmail
step guest-fs mkfs.ext4 -q -L mailroot /dev/vgmail/root
step guest-vg-off vgchange -q -an vgmail
step close-imap cryptsetup close cr_imap_encr

# Inside cr_web: a guest with a partition table (the host does not look inside it).
step open-web cryptsetup open --key-file /etc/luksvm/keys/web.key /dev/volgrp4/lvweb_hd0 cr_web
step web-partitions sh -c 'echo "type=83" | sfdisk -q /dev/mapper/cr_web'
# SeaBIOS boots a disk whose first sector ends in 55 AA, and sfdisk's boot code is zeros: the guest
# ran through memory on a whole vCPU of this VM (40 CPU-s in 39 s; with the disk zeroed, 12 s, its
# start). A boot code of cli; hlt keeps it halted, and it still ignores ACPI.
printf '\372\364\353\375' | dd of=/dev/mapper/cr_web bs=1 count=4 conv=notrunc status=none
step close-web cryptsetup close cr_web

# The guests (no OS, 64 MiB; see define_guest), each on its volume.
define_guest mail "$(block_disk cr_imap_encr "discard='unmap'")"
define_guest web "$(block_disk cr_web "discard='unmap'")"

# Leave the host as a user would reboot it: no mapping open.
test -z "$(dmsetup ls --target crypt | grep -v 'No devices found' || true)"

python3 - <<'PY' > seed.json
import json, subprocess

def out(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()

def uuid(lv):
    return out("cryptsetup", "luksUUID", "/dev/volgrp4/" + lv)

info = {
    "luksvm_version": open("luksvm-version").read(),
    "vg": "volgrp4",
    "pv_disk": "/dev/disk/by-id/virtio-pv0",
    "volumes": {
        "cr_imap_encr": {"lv": "lvimap_hd0", "key": "/etc/luksvm/keys/imap.key", "guest": "mail",
                         "luks_uuid": uuid("lvimap_hd0"), "guest_vg": "vgmail"},
        "cr_web": {"lv": "lvweb_hd0", "key": "/etc/luksvm/keys/web.key", "guest": "web",
                   "luks_uuid": uuid("lvweb_hd0"), "guest_vg": None},
    },
    "domains": out("virsh", "-c", "qemu:///system", "list", "--all", "--name").split(),
}
print(json.dumps(info, indent=2))
PY
cat seed.json

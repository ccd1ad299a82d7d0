# Storage smoke on the seed host: open both volumes with their keyfiles, find the guest's VG inside
# cr_imap_encr, show that the mapping is held while that VG is active, then close in the right
# order (guest VG off, then close). Every step is timed (steps.tsv).

step open-imap cryptsetup open --key-file /etc/luksvm/keys/imap.key /dev/volgrp4/lvimap_hd0 cr_imap_encr
step open-web cryptsetup open --key-file /etc/luksvm/keys/web.key /dev/volgrp4/lvweb_hd0 cr_web
step settle udevadm settle

# The host's LVM sees the guest's PV inside the mapping (udev may already have activated the VG).
pvs --reportformat json -o pv_name,vg_name > pvs.json
step guest-vg-on vgchange -ay vgmail
blkid -s LABEL -o value /dev/vgmail/root > guest-fs-label
dmsetup ls --tree > dm-tree.txt

# Wrong order: the mapping is held while the guest VG is active.
expect_fail close-while-guest-vg-active cryptsetup close cr_imap_encr

# Right order.
step guest-vg-off vgchange -an vgmail
step close-imap cryptsetup close cr_imap_encr
step close-web cryptsetup close cr_web
dmsetup ls --target crypt > crypt-after.txt

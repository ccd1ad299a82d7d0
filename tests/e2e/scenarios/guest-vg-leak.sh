# Runs in the boot after /etc/crypttab listed both volumes (no luksvm): record what the host did by
# itself, then show that `cryptsetup close` fails while the guest VG it activated is active.

# systemd-cryptsetup opened the volumes at boot; event-based LVM activation found the guest's PV
# inside cr_imap_encr and activated vgmail (lvm-activate-vgmail.service). Give udev time to finish.
step mapping-open wait_until 60 test -b /dev/mapper/cr_imap_encr
step settle udevadm settle
wait_until 60 sh -c 'lvs --noheadings -o lv_active vgmail/root | grep -q active' || true
lvs --reportformat json -o vg_name,lv_name,lv_active vgmail > vgmail-lvs.json
dmsetup info -c --noheadings -o open cr_imap_encr > open-count
dmsetup ls --tree > dm-tree.txt

expect_fail close-while-guest-vg-active cryptsetup close cr_imap_encr

# The way out, by hand (what `luksvm lock` automates): guest VG off, then close.
step guest-vg-off vgchange -an vgmail
step close cryptsetup close cr_imap_encr

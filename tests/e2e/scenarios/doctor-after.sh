# Boot 2, after the printed fix: luksvm.target unlocks cr_imap_encr at boot; the host's LVM must
# leave vgmail alone, and doctor's guest-vg-leak check must be OK.

step mapping-open wait_until 120 test -b /dev/mapper/cr_imap_encr
step settle udevadm settle
sleep 3  # room for a (wrong) event activation to happen before looking
# --devices makes LVM look at the mapping whatever the filter says: is the guest VG active?
lvs --reportformat json -o vg_name,lv_name,lv_active --devices /dev/mapper/cr_imap_encr vgmail \
    > vgmail-lvs.json
rc=0
luksvm doctor --json guest-vg-leak > after.json || rc=$?
result after-rc "$rc"

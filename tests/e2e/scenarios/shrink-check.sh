# Boot 2 of test_shrink.py: after the shrink of both stacks and their growth back (shrink.sh) and a
# reboot, read every layer back in bytes and sectors, and prove the data intact: sha256sum -c of
# every file, e2fsck -f clean, both guest VGs complete.

part=$(readlink -f /dev/disk/by-id/virtio-pv1-part1)

# the containers, as the kernel and the partition table see them
lvs --reportformat json --units b --nosuffix -o lv_name,lv_size,seg_count volgrp4 > host-lvs.json
vgs --reportformat json --units b --nosuffix -o vg_name,vg_free,vg_extent_size volgrp4 > host-vgs.json
sfdisk --json /dev/disk/by-id/virtio-pv1 > b-sfdisk.json
cat "/sys/class/block/$(basename "$part")/size" > b-part-kernel-sectors

step a-open cryptsetup open --key-file /etc/luksvm/keys/imap.key /dev/volgrp4/lvimap_hd0 cr_imap_encr
step b-open cryptsetup open --key-file /etc/luksvm/keys/data.key "$part" cr_data
udevadm settle
cryptsetup status cr_imap_encr > a-status.txt
cryptsetup status cr_data > b-status.txt
for vg in vgmail vgdata; do
    step "vgck-$vg" vgck "$vg"
    step "activate-$vg" vgchange -q -ay "$vg"
done
pvs --reportformat json --units b --nosuffix -o pv_name,vg_name,pe_start,pv_size,pv_pe_count,pv_pe_alloc_count,dev_size \
    > pvs.json
lvs --reportformat json --units b --nosuffix -o vg_name,lv_name,lv_size,seg_count,lv_attr vgmail vgdata \
    > guest-lvs.json
pvs --reportformat json --units b --nosuffix --segments \
    -o pv_name,pvseg_start,pvseg_size,lv_name,seg_le_ranges > segments.json

for pair in a-root:vgmail/root a-data:vgmail/data b-home:vgdata/home b-srv:vgdata/srv; do
    name=${pair%%:*} lv=/dev/${pair#*:}
    step "fsck-$name" e2fsck -f -n "$lv"
    dumpe2fs -h "$lv" 2> /dev/null | grep -E '^(Block count|Block size):' > "$name.fs.txt"
    mkdir -p "/mnt/$name"
    mount -o ro "$lv" "/mnt/$name"
    (cd "/mnt/$name" && step "sha256-$name" sha256sum --quiet -c "$E2E_IN/$name.sha256")
    umount "/mnt/$name"
done

vgchange -q -an vgmail vgdata
cryptsetup close cr_imap_encr
cryptsetup close cr_data

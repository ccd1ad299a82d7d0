#!/bin/bash
# Regenerates seed-*.json/txt: the seed host's layout made for real on sparse files and loop devices
# (LVM with activation off, so nothing is activated): a 104 GiB partition 2 at sector 2,099,200,
# LUKS1 with payload offset 65,537 sectors, a PV with 4 MiB extents, lvroot 80 GiB at PE 0 and
# lvswap 2 GiB at PE 25,600 behind a gap, an 80 GiB ext4 on lvroot. Run as root from this directory.
set -euo pipefail
out=$(pwd)
work=$(mktemp -d)
loops=()
cleanup() {
    for l in "${loops[@]}"; do losetup -d "$l" || true; done
    rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/lvm"
cat > "$work/lvm/lvm.conf" <<CONF
global { activation = 0 }
devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 filter = [ "a|^/dev/loop[0-9]+\$|", "r|.*|" ] }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup_dir = "$work/lvm/backup" archive_dir = "$work/lvm/archive" }
CONF
export LVM_SYSTEM_DIR=$work/lvm LVM_SUPPRESS_FD_WARNINGS=1
vg=seed$RANDOM$RANDOM
truncate -s 110G "$work/disk.img"
printf 'label: gpt\nstart=2048, size=2097152\nstart=2099200, size=218103808\n' | sfdisk -q "$work/disk.img"
sfdisk --json "$work/disk.img" | sed "s|$work/disk.img|/dev/sda|g" > "$out/seed-sfdisk.json"
part=$((2099200 * 512))
loops+=("$(losetup -f --show --offset $part --sizelimit $((218103808 * 512)) "$work/disk.img")")
printf 'seed' | cryptsetup luksFormat -q --type luks1 --pbkdf-force-iterations 1000 \
    --align-payload 65537 --key-file=- "${loops[0]}"
cryptsetup luksDump "${loops[0]}" > "$out/seed-luksdump.txt"
offset=$((65537 * 512))
loops+=("$(losetup -f --show --offset $((part + offset)) --sizelimit $(((218103808 - 65537) * 512)) "$work/disk.img")")
pv=${loops[1]}
pvcreate -q "$pv"
vgcreate -q -s 4m "$vg" "$pv"
lvcreate -q -Zn -an -l 20480 -n lvroot "$vg" "$pv:0-20479"
lvcreate -q -Zn -an -l 512 -n lvswap "$vg" "$pv:25600-26111"
report() {
    "$@" --reportformat json --units b --nosuffix \
        | sed -e "s|$pv|/dev/mapper/cr_seed|g" -e "s|$vg|vgseed|g"
}
report pvs --segments -o pv_name,vg_name,vg_extent_size,dev_size,pe_start,pv_pe_count,pv_mda_count,pvseg_start,pvseg_size,lv_name,seg_start_pe \
    "$pv" > "$out/seed-pvs.json"
report lvs -a --segments -o vg_name,lv_name,lv_attr,lv_size,segtype,lv_layout,origin,pool_lv,lv_active,lv_dm_path \
    "$vg" > "$out/seed-lvs.json"
pe0=$(( part + offset + 1048576 ))
loops+=("$(losetup -f --show --offset $pe0 --sizelimit $((80 * 1024 * 1024 * 1024)) "$work/disk.img")")
mkfs.ext4 -q -b 4096 -E lazy_itable_init=1,nodiscard "${loops[2]}"
dumpe2fs -h "${loops[2]}" 2>/dev/null | sed "s|${loops[2]}|/dev/mapper/vgseed-lvroot|g" > "$out/seed-dumpe2fs.txt"
resize2fs -P "${loops[2]}" 2>/dev/null > "$out/seed-resize2fs-P.txt"
vgremove -q -f "$vg"

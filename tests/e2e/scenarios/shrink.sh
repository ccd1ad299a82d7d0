# luksvm shrink on both stacks, with data (boot 1 of test_shrink.py; shrink-check.sh is boot 2).
#
# Stack A (host LV): volgrp4/lvimap_hd0 grown to 640 MiB → LUKS2 cr_imap_encr → vgmail: root
#   grown to 320 MiB (PE 0-79), a 64 MiB gap, LV data 64 MiB (PE 96-111). Shrink root to 128 MiB:
#   data must move down (pvmove), then PV, mapping and host LV shrink, mapping and PV grow back.
#   The container is closed and configured in crypttab.d: luksvm opens it with its keyfile and
#   closes it again.
# Stack B (partition): disk pv1 → GPT partition 1 (sectors 2048-919551, 448 MiB) → LUKS1 with
#   payload offset 4,104 sectors (2 MiB + 4 KiB: not a MiB multiple; cryptsetup 2.6 refuses to format the issue's 65,537, "Data offset is not multiple of 4096 bytes") → vgdata: home 256 MiB,
#   a 32 MiB gap, srv 32 MiB. Shrink home to 128 MiB. The admin has it open and the VG active,
#   which must stay so. The first run is killed between steps (after lvreduce, as the pvmove
#   starts); the same command again resumes.
# Files of known SHA-256 are written into every LV first; boot 2 checks them.

fast_kdf=(--pbkdf pbkdf2 --pbkdf-force-iterations 1000)

into() {  # into FILE CMD...: CMD's stdout into FILE (`step` prints its own line on stdout)
    local file=$1
    shift
    "$@" > "$file"
}

# fill DIR MIB: MIB MiB of random files spread over 8 directories (ext4 puts top-level
# directories in different block groups, so resize2fs has data to move), plus small files.
fill() {
    local dir=$1 mib=$2 d
    for d in $(seq 1 8); do
        mkdir -p "$dir/d$d"
        head -c $((mib * 1024 * 1024 / 8)) /dev/urandom > "$dir/d$d/blob"
        seq "$d" 1000 > "$dir/d$d/numbers"
    done
    (cd "$dir" && find . -type f ! -name 'lost+found' -print0 | sort -z | xargs -0 sha256sum) \
        > "$dir.sha256"
}

facts() {  # facts NAME LV: what the planner reads, read with the tools themselves
    local name=$1 lv=$2
    dumpe2fs -h "$lv" 2> /dev/null > "$name.dumpe2fs"
    resize2fs -P "$lv" 2> /dev/null > "$name.resize2fs-P"
}

# --- stack A: make the guest disk bigger, with a second LV behind a gap --------------------------
install -d -m 0755 /etc/luksvm/crypttab.d
cat > /etc/luksvm/crypttab.d/10-seed.conf <<'EOF'
cr_imap_encr /dev/volgrp4/lvimap_hd0 /etc/luksvm/keys/imap.key luks,discard,x-luksvm.guest=mail
EOF
step a-grow-host-lv lvextend -q -L 640m volgrp4/lvimap_hd0
step a-open cryptsetup open --key-file /etc/luksvm/keys/imap.key /dev/volgrp4/lvimap_hd0 cr_imap_encr
udevadm settle
step a-grow-pv pvresize -q /dev/mapper/cr_imap_encr
vgchange -q -ay vgmail
step a-grow-root lvextend -q -L 320m vgmail/root
step a-grow-root-fs resize2fs /dev/vgmail/root
lvcreate -q -y -n gap -L 64m vgmail
lvcreate -q -y -n data -L 64m vgmail
lvremove -q -y vgmail/gap
mkfs.ext4 -q -L maildata /dev/vgmail/data
mkdir -p /mnt/a-root /mnt/a-data
mount /dev/vgmail/root /mnt/a-root
mount /dev/vgmail/data /mnt/a-data
step a-fill fill /mnt/a-root 40
fill /mnt/a-data 8
umount /mnt/a-root /mnt/a-data
cp /mnt/a-root.sha256 a-root.sha256
cp /mnt/a-data.sha256 a-data.sha256
pvs --reportformat json --units b --nosuffix --segments \
    -o pv_name,pe_start,pv_size,pv_pe_count,pvseg_start,pvseg_size,lv_name,seg_le_ranges \
    --devices /dev/mapper/cr_imap_encr > a-segments-before.json
facts a-root /dev/vgmail/root
cryptsetup luksDump /dev/volgrp4/lvimap_hd0 > a-luksdump.txt
vgchange -q -an vgmail
step a-close cryptsetup close cr_imap_encr

# --- stack B: partition → LUKS1 → vgdata -------------------------------------------------------
disk=/dev/disk/by-id/virtio-pv1
head -c 64 /dev/urandom > /etc/luksvm/keys/data.key
chmod 0400 /etc/luksvm/keys/data.key
step b-partition sh -c "printf 'label: gpt\nstart=2048, size=917504, type=linux\n' | sfdisk -q $disk"
udevadm settle
part=$(readlink -f "$disk-part1")
step b-luksformat cryptsetup luksFormat -q --type luks1 --offset 4104 "${fast_kdf[@]}" \
    --key-file /etc/luksvm/keys/data.key "$part"
step b-open cryptsetup open --key-file /etc/luksvm/keys/data.key "$part" cr_data
udevadm settle
pvcreate -q /dev/mapper/cr_data
vgcreate -q vgdata /dev/mapper/cr_data
lvcreate -q -y -n home -L 256m vgdata
lvcreate -q -y -n gap -L 32m vgdata
lvcreate -q -y -n srv -L 32m vgdata
lvremove -q -y vgdata/gap
mkfs.ext4 -q -L home /dev/vgdata/home
mkfs.ext4 -q -L srv /dev/vgdata/srv
mkdir -p /mnt/b-home /mnt/b-srv
mount /dev/vgdata/home /mnt/b-home
mount /dev/vgdata/srv /mnt/b-srv
step b-fill fill /mnt/b-home 32
fill /mnt/b-srv 4
umount /mnt/b-home /mnt/b-srv
cp /mnt/b-home.sha256 b-home.sha256
cp /mnt/b-srv.sha256 b-srv.sha256
facts b-home /dev/vgdata/home
cryptsetup luksDump "$part" > b-luksdump.txt

# --- refusals ----------------------------------------------------------------------------------
expect_fail below-minimum luksvm shrink plan --lv vgdata/home --to 8MiB
expect_fail bare-size luksvm shrink plan --lv vgdata/home --to 60G

# --- stack A: plan, then run ---------------------------------------------------------------------
step a-plan-json into a-plan.json luksvm shrink plan --lv vgmail/root --to 128MiB \
    --device /dev/volgrp4/lvimap_hd0 --json
luksvm shrink plan --lv vgmail/root --to 128MiB --device /dev/volgrp4/lvimap_hd0 > a-plan.txt
step a-run luksvm shrink run --lv vgmail/root --to 128MiB --device /dev/volgrp4/lvimap_hd0 \
    --yes-i-have-a-backup > a-run.txt 2>&1 || { cat a-run.txt; exit 1; }
cat a-run.txt
# luksvm opened the container and activated vgmail: both must be gone again
dmsetup ls --target crypt > a-crypt-after.txt
lvs --reportformat json -o lv_name,lv_active vgmail > a-lvs-after.json 2> /dev/null || true

# --- stack B: plan, a run killed between steps, the same command again -------------------------
step b-plan-json into b-plan.json luksvm shrink plan --lv vgdata/home --to 128MiB --json
luksvm shrink plan --lv vgdata/home --to 128MiB > b-plan.txt
# The hook: a pvmove in front of PATH that kills luksvm (its parent) before moving anything, i.e.
# right after the lvreduce step and its check. Not under /run: the initramfs mounts it noexec,
# and Python then quietly runs the next pvmove in PATH.
install -d /root/e2e-hook
printf '#!/bin/sh\nkill -KILL "$PPID"\nexit 137\n' > /root/e2e-hook/pvmove
chmod 0755 /root/e2e-hook/pvmove
rc=0
PATH=/root/e2e-hook:$PATH luksvm shrink run --lv vgdata/home --to 128MiB \
    --yes-i-have-a-backup > b-run-killed.txt 2>&1 || rc=$?
cat b-run-killed.txt
result b-killed-rc "$rc"
lvs --reportformat json --units b --nosuffix -o lv_name,lv_size vgdata > b-lvs-killed.json
step b-plan-resume into b-plan-resume.json luksvm shrink plan --lv vgdata/home --to 128MiB --json
step b-run-resume luksvm shrink run --lv vgdata/home --to 128MiB --yes-i-have-a-backup \
    > b-run-resume.txt 2>&1 || { cat b-run-resume.txt; exit 1; }
cat b-run-resume.txt
step b-run-again luksvm shrink run --lv vgdata/home --to 128MiB --yes-i-have-a-backup \
    > b-run-again.txt 2>&1 || { cat b-run-again.txt; exit 1; }
# what the admin had open and active stays so
dmsetup ls --target crypt > b-crypt-after.txt
lvs --reportformat json -o lv_name,lv_active vgdata > b-lvs-after.json
ls /var/lib/luksvm/shrink > backup-dirs.txt

# --- grow: both stacks grown back (test_shrink.py checks the figures; boot 2 the data) ---------
# Stack A, closed again after its shrink: luksvm opens it with its configured key, grows the host
# LV, the mapping (LUKS2: the key on stdin), the PV, root and its filesystem, and closes it again.
step a-grow-plan into a-grow-plan.json luksvm grow --lv vgmail/root --to 320MiB \
    --device /dev/volgrp4/lvimap_hd0 --dry-run --json
step a-grow luksvm grow --lv vgmail/root --to 320MiB --device /dev/volgrp4/lvimap_hd0 \
    > a-grow.txt 2>&1 || { cat a-grow.txt; exit 1; }
cat a-grow.txt
dmsetup ls --target crypt > a-crypt-after-grow.txt
# Stack B, open and active as the admin left it, home mounted: the partition grows in use
# (sfdisk, then BLKPG through partx), ext4 grows online.
mount /dev/vgdata/home /mnt/b-home
step b-grow-plan into b-grow-plan.json luksvm grow --lv vgdata/home --to 256MiB --dry-run --json
step b-grow luksvm grow --lv vgdata/home --to 256MiB > b-grow.txt 2>&1 || { cat b-grow.txt; exit 1; }
cat b-grow.txt
findmnt -n -o SOURCE /mnt/b-home > b-mounted-after-grow
umount /mnt/b-home

# --- grow: a running guest's disk (guest web on cr_web, LUKS2 on host LV lvweb_hd0) -----------
cat >> /etc/luksvm/crypttab.d/10-seed.conf <<'CONF'
cr_web /dev/volgrp4/lvweb_hd0 /etc/luksvm/keys/web.key luks,discard,x-luksvm.guest=web
CONF
step g-open cryptsetup open --key-file /etc/luksvm/keys/web.key /dev/volgrp4/lvweb_hd0 cr_web
udevadm settle
old=$(blockdev --getsize64 /dev/mapper/cr_web)
result g-old-bytes "$old"
head -c "$old" /dev/mapper/cr_web | sha256sum > g-before.sha256
step g-start virsh -q -c qemu:///system start web
cat /run/libvirt/qemu/web.pid > g-pid-before
lv_bytes() { lvs --noheadings --units b --nosuffix -o lv_size volgrp4/lvweb_hd0 | tr -d ' '; }
lv_bytes > g-lv-before
expect_fail g-bare-size luksvm grow web --by 60G
expect_fail g-not-larger luksvm grow web --to 64MiB
expect_fail g-no-room luksvm grow web --by 100GiB
expect_fail g-inside luksvm grow web --by 64MiB --inside
lv_bytes > g-lv-after-refusals
blockdev --getsize64 /dev/mapper/cr_web > g-mapping-after-refusals
step g-plan into g-plan.json luksvm grow web --by 64MiB --dry-run --json
luksvm grow web --by 64MiB --dry-run > g-plan.txt
# killed between lvextend and cryptsetup resize: the same command again resumes
install -d /root/e2e-grow-hook
printf '#!/bin/sh\n[ "$1" = resize ] && { kill -KILL "$PPID"; exit 137; }\nexec /usr/sbin/cryptsetup "$@"\n' \
    > /root/e2e-grow-hook/cryptsetup
chmod 0755 /root/e2e-grow-hook/cryptsetup
rc=0
PATH=/root/e2e-grow-hook:$PATH luksvm grow web --by 64MiB > g-killed.txt 2>&1 || rc=$?
cat g-killed.txt
result g-killed-rc "$rc"
lv_bytes > g-lv-killed
step g-resume luksvm grow web --by 64MiB > g-resume.txt 2>&1 || { cat g-resume.txt; exit 1; }
cat g-resume.txt
# a whole grow, timed: host LV, mapping, QEMU
step g-grow luksvm grow web --to 208MiB > g-grow.txt 2>&1 || { cat g-grow.txt; exit 1; }
cat g-grow.txt
cat /run/libvirt/qemu/web.pid > g-pid-after
virsh -q -c qemu:///system domstate web > g-state-after
python3 -c 'import libvirt; d = libvirt.open("qemu:///system").lookupByName("web"); print(d.blockInfo("vda", 0)[0])' \
    > g-capacity
blockdev --getsize64 /dev/mapper/cr_web > g-mapping-bytes
lv_bytes > g-lv-bytes
head -c "$old" /dev/mapper/cr_web | sha256sum > g-after.sha256
virsh -q -c qemu:///system destroy web
cryptsetup close cr_web

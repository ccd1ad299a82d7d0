# luksvm migrate, with data (boot 1 of test_migrate.py; migrate-check.sh is boot 2).
#   guest "plain": vda a raw file (256 MiB, ext4 with files of known SHA-256); its migration is
#     killed (the whole process group, as a power cut would) during the copy, then run again.
#   guest "q2": vda a qcow2 file converted from a 64 MiB raw disk with files of its own.
# Both go to new LUKS2 LVs in volgrp4 with keyfiles; the guests are not started here.

uri=qemu:///system
images=/var/lib/libvirt/images
install -d -m 0711 "$images"
printf '[guests]\nstop_timeout = 5s\n' > /etc/luksvm/luksvm.conf

# make_disk NAME MIB: an ext4 image of MIB MiB holding random files; NAME.sha256 lists them
make_disk() {
    local name=$1 mib=$2 d
    rm -rf "/root/$name" && mkdir -p "/root/$name"
    for d in 1 2 3 4; do
        head -c $((mib * 1024 * 16)) /dev/urandom > "/root/$name/file$d"
    done
    seq 1 5000 > "/root/$name/numbers"
    (cd "/root/$name" && sha256sum file* numbers) > "$name.sha256"
    mkfs.ext4 -q -F -L "$name" -d "/root/$name" "$images/$name.raw" "${mib}M"
}
step make-plain make_disk plain 256
step make-q2 make_disk q2 64
step convert-q2 qemu-img convert -f raw -O qcow2 "$images/q2.raw" "$images/q2.qcow2"
rm "$images/q2.raw"
sha256sum "$images/plain.raw" | cut -d' ' -f1 > plain-image.sha256
stat -c %s "$images/plain.raw" > plain-image.size
qemu-img info --output=json -f qcow2 "$images/q2.qcow2" > q2-info.json

# A NIC, so that migrate is seen keeping what is not a disk. Without its option ROM: these guests
# boot no OS, and SeaBIOS would run iPXE's network boot (DHCP over user networking) while they run.
for pair in plain:raw:52:54:00:e2:e0:01 q2:qcow2:52:54:00:e2:e0:02; do
    guest=${pair%%:*} rest=${pair#*:}
    format=${rest%%:*} mac=${rest#*:}
    define_guest "$guest" "
    <disk type='file' device='disk'>
      <driver name='qemu' type='$format'/>
      <source file='$images/$guest.$format'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'>
      <mac address='$mac'/>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>"
    virsh -q -c $uri dumpxml --inactive --security-info "$guest" > "$guest.before.xml"
done

for name in plain q2; do
    head -c 64 /dev/urandom > /etc/luksvm/keys/$name.key
    chmod 0400 /etc/luksvm/keys/$name.key
done
fast_kdf=(--pbkdf pbkdf2 --pbkdf-force-iterations 1000)

step dry-run luksvm migrate plain --disk vda --to volgrp4/lvplain --name cr_plain \
    --key /etc/luksvm/keys/plain.key "${fast_kdf[@]}" --dry-run > plain-dry-run.txt

# --- plain: killed during the copy, then the same command again ---------------------------------
setsid luksvm migrate plain --disk vda --to volgrp4/lvplain --name cr_plain \
    --key /etc/luksvm/keys/plain.key "${fast_kdf[@]}" > plain-killed.txt 2>&1 &
pid=$!
# the copy has begun when luksvm says so and qemu-img runs
wait_until 300 sh -c "grep -q '^copying' plain-killed.txt && pgrep -x qemu-img > /dev/null"
sleep 1
kill -KILL -- "-$pid"
rc=0
wait "$pid" || rc=$?
result plain-killed-rc "$rc"
cat plain-killed.txt
cp /var/lib/luksvm/migrate/plain.vda.json plain-state-killed.json
step plain-resume luksvm migrate plain --disk vda --to volgrp4/lvplain --name cr_plain \
    --key /etc/luksvm/keys/plain.key "${fast_kdf[@]}" > plain-resume.txt 2>&1 \
    || { cat plain-resume.txt; exit 1; }
cat plain-resume.txt
step plain-again luksvm migrate plain --disk vda --to volgrp4/lvplain --name cr_plain \
    --key /etc/luksvm/keys/plain.key "${fast_kdf[@]}" > plain-again.txt 2>&1

# --- q2 in one go --------------------------------------------------------------------------------
step q2-migrate luksvm migrate q2 --disk vda --to volgrp4/lvq2 --name cr_q2 \
    --key /etc/luksvm/keys/q2.key "${fast_kdf[@]}" > q2-migrate.txt 2>&1 \
    || { cat q2-migrate.txt; exit 1; }
cat q2-migrate.txt

for guest in plain q2; do
    virsh -q -c $uri dumpxml --inactive --security-info "$guest" > "$guest.after.xml"
    cp "/var/lib/luksvm/migrate/$guest.vda.previous.xml" "$guest.previous.xml"
    cp "/etc/luksvm/crypttab.d/60-migrate-cr_$guest.conf" "$guest.fragment"
    systemctl is-active "luksvm-unlock@cr_$guest.service" > "$guest.unit-active" || true
    cryptsetup luksDump "/dev/volgrp4/lv$guest" > "$guest.luksdump.txt"
done
lvs --reportformat json --units b --nosuffix -o lv_name,lv_size volgrp4 > lvs.json
# the sources are untouched
sha256sum "$images/plain.raw" | cut -d' ' -f1 > plain-image-after.sha256

step enable-target systemctl enable luksvm.target

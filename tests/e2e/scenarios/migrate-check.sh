# Boot 2 of test_migrate.py: luksvm.target unlocked cr_plain and cr_q2 and started both guests
# from them. Then, with the guests shut off: the files in each mapping are the originals, and
# `luksvm migrate --rollback` gives each domain its previous definition back.

uri=qemu:///system
for guest in plain q2; do
    wait_until 180 systemctl is-active -q "luksvm-guest@$guest.service"
    systemctl is-active "luksvm-unlock@cr_$guest.service" > "$guest.unit-active" || true
    virsh -q -c $uri domstate "$guest" > "$guest.state"
    virsh -q -c $uri domblklist "$guest" > "$guest.blklist"
done
journalctl -b -o cat -u 'luksvm-unlock@*' -u 'luksvm-guest@*' > units.log || true

for guest in plain q2; do
    step "stop-$guest" systemctl stop "luksvm-guest@$guest.service"
    virsh -q -c $uri domstate "$guest" > "$guest.state-after-stop"
done

# the whole guest-visible disk, then every file
size=$(cat "$E2E_IN/plain-image.size")
head -c "$size" /dev/mapper/cr_plain | sha256sum | cut -d' ' -f1 > plain-mapping.sha256
for guest in plain q2; do
    mkdir -p "/mnt/$guest"
    mount -o ro,noload "/dev/mapper/cr_$guest" "/mnt/$guest"
    (cd "/mnt/$guest" && step "sha256-$guest" sha256sum --quiet -c "$E2E_IN/$guest.sha256")
    umount "/mnt/$guest"
done

for guest in plain q2; do
    step "rollback-$guest" luksvm migrate --rollback "$guest" > "$guest.rollback.txt" 2>&1 \
        || { cat "$guest.rollback.txt"; exit 1; }
    virsh -q -c $uri dumpxml --inactive --security-info "$guest" > "$guest.rolled-back.xml"
    test -e "/dev/mapper/cr_$guest" && echo open > "$guest.mapping-after-rollback" \
        || echo closed > "$guest.mapping-after-rollback"
    ls /etc/luksvm/crypttab.d > "$guest.fragments-after-rollback"
done
lvs --reportformat json -o lv_name volgrp4 > lvs-after-rollback.json

# Boot 2 of test_migrate.py: luksvm.target unlocked cr_plain and cr_q2 and started both guests
# from them. Then, with the guests shut off (plain by the admin, behind luksvm's back): the files in each mapping are the originals, and
# `luksvm migrate --rollback` gives each domain its previous definition back.

uri=qemu:///system
for guest in plain q2; do
    wait_until 180 systemctl is-active -q "luksvm-guest@$guest.service"
    systemctl is-active "luksvm-unlock@cr_$guest.service" > "$guest.unit-active" || true
    virsh -q -c $uri domstate "$guest" > "$guest.state"
    virsh -q -c $uri domblklist "$guest" > "$guest.blklist"
done
journalctl -b -o cat -u 'luksvm-unlock@*' -u 'luksvm-guest@*' > units.log || true

# While plain runs, lock and rollback refuse. Then the admin shuts plain off behind luksvm's back
# (virsh destroy: these guests boot no OS that would answer ACPI): its luksvm-guest@ unit remains
# active after exit, and the rollback below stops that stale unit itself and says so.
expect_fail lock-running luksvm lock cr_plain
expect_fail rollback-running luksvm migrate --rollback plain
step stop-plain virsh -q -c $uri destroy plain
systemctl is-active luksvm-guest@plain.service > plain.guest-unit-after-destroy || true
virsh -q -c $uri domstate plain > plain.state-after-stop
step stop-q2 systemctl stop luksvm-guest@q2.service
virsh -q -c $uri domstate q2 > q2.state-after-stop

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
systemctl is-active luksvm-guest@plain.service > plain.guest-unit-after-rollback || true

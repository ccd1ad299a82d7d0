# Boot 3 of test_boot.py: cr_web's keyfile is wrong. Record what the boot reached; the test reads
# the rest (this boot, and boot 2's shutdown) from the journal.
uri=qemu:///system
systemctl is-active multi-user.target > multi-user-state || true
luksvm status --json > status-boot.json || true
virsh -q -c $uri list --state-running --name | sed '/^$/d' | sort | tr '\n' ' ' > running-at-boot
for unit in luksvm-unlock@cr_web.service luksvm-guest@web.service luksvm-guest@mail.service \
    luksvm-guest@spare.service; do
    printf '%s %s\n' "$unit" "$(systemctl show -p ActiveState --value "$unit")"
done > unit-states
ls -A /run/systemd/ask-password > ask-files-at-boot 2> /dev/null || true

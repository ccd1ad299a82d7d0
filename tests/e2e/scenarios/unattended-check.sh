# Boot 2 of test_unattended.py: the first boot with only TPM2 and Tang keys. Both volumes must
# unlock with no prompt and no keyfile and their guests run. Then Tang is switched off for boot 3.
uri=qemu:///system
wait_until 240 systemctl is-active -q luksvm-guest@mail.service luksvm-guest@web.service
for unit in luksvm-unlock@cr_imap_encr.service luksvm-unlock@cr_web.service \
    luksvm-unlock@cr_other.service luksvm-guest@mail.service luksvm-guest@web.service; do
    printf '%s %s\n' "$unit" "$(systemctl show -p ActiveState --value "$unit")"
done > unit-states
virsh -q -c $uri list --state-running --name | sed '/^$/d' | sort | tr '\n' ' ' > running
ls -A /run/systemd/ask-password > ask-files 2> /dev/null || true
luksvm status --json > status.json
luksvm keys --json > keys.json
systemd-analyze blame --no-pager > blame.txt
systemctl is-system-running > system-state || true
step tang-off sh -c 'systemctl disable --now tangd.socket && systemctl mask tangd.socket'

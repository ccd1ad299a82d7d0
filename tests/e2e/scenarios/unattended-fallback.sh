# Boot 3 of test_unattended.py: a new TPM (fresh swtpm state) and Tang down. Both unattended
# volumes fail within their bound and never prompt; multi-user is reached; cr_other is unaffected.
# Then the admin unlocks cr_imap_encr on a terminal with the recovery key and guest mail starts.
# In: $E2E_IN/recovery-key, $E2E_IN/type_passphrase.py.
uri=qemu:///system
systemctl is-active multi-user.target > multi-user-state || true
for unit in luksvm-unlock@cr_imap_encr.service luksvm-unlock@cr_web.service \
    luksvm-unlock@cr_other.service luksvm-guest@mail.service luksvm-guest@web.service; do
    printf '%s %s\n' "$unit" "$(systemctl show -p ActiveState --value "$unit")"
done > unit-states
ls -A /run/systemd/ask-password > ask-files 2> /dev/null || true
rc=0; luksvm keys --json > keys-broken.json || rc=$?
result keys-rc "$rc"
rc=0; luksvm doctor --json unattended-keys > doctor-broken.json || rc=$?
result doctor-rc "$rc"
expect_fail unlock-without-terminal luksvm unlock cr_imap_encr < /dev/null
step unlock-recovery python3 "$E2E_IN/type_passphrase.py" "$E2E_IN/recovery-key" prompt.txt \
    ps.txt luksvm unlock cr_imap_encr
wait_until 180 systemctl is-active -q luksvm-guest@mail.service
virsh -q -c $uri list --state-running --name | sed '/^$/d' | sort | tr '\n' ' ' > running-after
systemctl show -p ActiveState --value luksvm-unlock@cr_imap_encr.service > imap-unit-after
luksvm status --json > status-after.json

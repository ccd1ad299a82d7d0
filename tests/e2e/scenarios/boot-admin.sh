# Boot 2 of test_boot.py: the first boot with luksvm's units. The boot itself is what the test reads
# from the journal; this scenario records the state the boot reached, then takes the admin's path:
# unlock the noauto passphrase volume on a terminal (its guest starts), stop a guest whose
# on_timeout=fail leaves it running, and make cr_web's keyfile wrong for the next boot.
# In: $E2E_IN/passphrase (no newline), $E2E_IN/type_passphrase.py.

uri=qemu:///system
running() {
    virsh -q -c $uri list --state-running --name | sed '/^$/d' | sort | tr '\n' ' '
}

systemctl is-active multi-user.target > multi-user-state || true
luksvm status --json > status-boot.json
result running-at-boot "$(running)"
systemctl show -p ActiveState --value luksvm-unlock@cr_pass.service > pass-unit-at-boot
ls -A /run/systemd/ask-password > ask-files-at-boot 2> /dev/null || true
# The leak luksvm handles: the host's LVM activated the guest's VG inside cr_imap_encr.
lvs --reportformat json -o vg_name,lv_name,lv_active vgmail > vgmail-lvs.json

# --- the admin unlocks the noauto volume over "ssh -t": systemctl's agent asks on the terminal ---
step unlock-pass python3 "$E2E_IN/type_passphrase.py" "$E2E_IN/passphrase" \
    "$E2E_RESULTS/prompt.txt" "$E2E_RESULTS/ps-during-prompt.txt" luksvm unlock cr_pass
systemctl show -p ActiveState --value luksvm-unlock@cr_pass.service > pass-unit-after-unlock
step pass-running wait_until 240 sh -c \
    "virsh -q -c $uri domstate pass | grep -qx running"
result running-after-unlock "$(running)"

# --- on_timeout=fail: the guest stays running, and so does its volume -------------------------
step stop-spare luksvm stop spare > stop-spare.out 2> stop-spare.err || true
result running-after-stop-spare "$(running)"
systemctl show -p ActiveState --value luksvm-guest@spare.service > spare-unit-after-stop
expect_fail lock-spare luksvm lock cr_spare
test -b /dev/mapper/cr_spare && result spare-open-after-lock yes
# Its unit takes the running guest back, so that host shutdown goes through it again.
step start-spare-again luksvm start spare
systemctl show -p ActiveState --value luksvm-guest@spare.service > spare-unit-again

# --- the passphrase is in no process list, environment or journal ------------------------------
ps -eo pid,args > ps.txt
grep -c -a -F -f "$E2E_IN/passphrase" ps.txt > passphrase-in-ps || true
grep -l -a -F -f "$E2E_IN/passphrase" /proc/[0-9]*/environ > passphrase-in-environ 2> /dev/null || true
journalctl --sync
journalctl -o export --all | grep -c -a -F -f "$E2E_IN/passphrase" > passphrase-in-journal || true

# --- the next boot finds a wrong keyfile for cr_web (same mode) ---------------------------------
head -c 64 /dev/urandom > /etc/luksvm/keys/web.key
stat -c '%a %U' /etc/luksvm/keys/web.key > web-key-mode

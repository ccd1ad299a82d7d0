# luksvm unlock / lock / status on the seed host (cr_imap_encr with the guest VG vgmail inside,
# cr_web; keyfiles in /etc/luksvm/keys). Direct mode (--no-start / --from-unit, what the units run):
# the unit files are another part's tests. Files written here are read back by test_unlock.py.

conf=/etc/luksvm/crypttab.d/10-seed.conf
install -d -m 0755 /etc/luksvm/crypttab.d
write_conf() {
    cat > "$conf"
}
write_conf <<'EOF'
cr_imap_encr /dev/volgrp4/lvimap_hd0 /etc/luksvm/keys/imap.key luks,discard,x-luksvm.guest=mail
cr_web       /dev/volgrp4/lvweb_hd0  /etc/luksvm/keys/web.key  luks,discard,x-luksvm.guest=web
EOF

# --- unlock with a keyfile; the host's LVM then activates the guest VG inside (the leak) --------
step unlock-imap luksvm unlock --no-start cr_imap_encr
step unlock-imap-again luksvm unlock --no-start cr_imap_encr
udevadm settle
step guest-vg-on vgchange -ay vgmail
luksvm status --json > status-open.json
dmsetup info -c -o name,open > dm-open.txt

# --- lock refused while a guest LV is mounted: nothing changes ---------------------------------
mount /dev/vgmail/root /mnt
expect_fail lock-while-mounted luksvm lock --from-unit cr_imap_encr
lvs --reportformat json -o lv_name,lv_active vgmail > lvs-while-mounted.json
test -e /dev/mapper/cr_imap_encr && result still-open-after-refusal yes
umount /mnt

# --- lock: guest VG off, settle, close ---------------------------------------------------------
luksvm lock --from-unit --dry-run cr_imap_encr > lock-dry-run.txt
step lock-imap luksvm lock --from-unit cr_imap_encr
test ! -e /dev/mapper/cr_imap_encr && result closed-after-lock yes
lvs --reportformat json -o lv_name,lv_active --devices /dev/volgrp4/lvimap_hd0 vgmail \
    > lvs-after-lock.json 2> /dev/null || true
step lock-imap-again luksvm lock --from-unit cr_imap_encr

# --- a wrong keyfile fails at once: no prompt, no ask-password file ----------------------------
head -c 64 /dev/urandom > /etc/luksvm/keys/wrong.key
chmod 0400 /etc/luksvm/keys/wrong.key
write_conf <<'EOF'
cr_web /dev/volgrp4/lvweb_hd0 /etc/luksvm/keys/wrong.key luks,x-luksvm.guest=web
EOF
expect_fail wrong-keyfile timeout 60 luksvm unlock --no-start cr_web
ls /run/systemd/ask-password/ > ask-files.txt 2>&1 || true

# --- a noauto passphrase volume: asked on the terminal, the secret nowhere else ----------------
passphrase="e2e-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '%s' "$passphrase" > /run/e2e-passphrase
printf '%s' "$passphrase" | cryptsetup luksAddKey -q --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --key-file /etc/luksvm/keys/web.key /dev/volgrp4/lvweb_hd0 -
write_conf <<'EOF'
cr_web /dev/volgrp4/lvweb_hd0 - luks,noauto,x-luksvm.guest=web
EOF
expect_fail unlock-without-terminal luksvm unlock cr_web
step unlock-passphrase keyctl session - python3 "$E2E_IN/type_passphrase.py" \
    /run/e2e-passphrase "$E2E_RESULTS/prompt.txt" "$E2E_RESULTS/ps-during-prompt.txt" \
    luksvm unlock --no-start cr_web
test -e /dev/mapper/cr_web && result web-open-after-passphrase yes
step lock-web luksvm lock --from-unit cr_web

# --- benchmark: luksvm vs the bare tools ($E2E_IN/bench-rounds rounds: LUKSVM_E2E_BENCH_ROUNDS) --
write_conf <<'EOF'
cr_web /dev/volgrp4/lvweb_hd0 /etc/luksvm/keys/web.key luks,x-luksvm.guest=web
EOF
# web (no OS, ignores ACPI) waits out a 1 s stop_timeout on both sides, then is destroyed
printf '[guests]\nstop_timeout = 1s\non_timeout = destroy\n' > /etc/luksvm/luksvm.conf
step bench sh -c 'python3 "$1/bench_unlock.py" --volume cr_web --device /dev/volgrp4/lvweb_hd0 \
    --key /etc/luksvm/keys/web.key --guest web --wait 1 --rounds "$(cat "$1/bench-rounds")" \
    --json > "$2/bench.json"' - "$E2E_IN" "$E2E_RESULTS"
rm /etc/luksvm/luksvm.conf

# --- the passphrase appears in no process list, environment or journal ------------------------
journalctl --sync 2> /dev/null || true
count=$(journalctl -o export -b 2> /dev/null | grep -c -a -F "$passphrase" || true)
result passphrase-in-journal "$count"
rm -f /run/e2e-passphrase

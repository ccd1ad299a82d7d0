# Guest lifecycle on a real libvirt with real QEMU guests (no OS: they ignore ACPI), without units:
# start gating, idempotent start, parallel stop after stop_timeout, on_timeout=fail,
# managedsave refused on the default (unencrypted) save directory.
uri=qemu:///system
install -d /etc/luksvm/crypttab.d
cat > /etc/luksvm/crypttab.d/10-seed.conf <<'CONF'
cr_imap_encr /dev/volgrp4/lvimap_hd0 /etc/luksvm/keys/imap.key luks,discard,x-luksvm.guest=mail
cr_web       /dev/volgrp4/lvweb_hd0  /etc/luksvm/keys/web.key  luks,discard,x-luksvm.guest=web
CONF
printf '[guests]\nstop_timeout = 10s\n' > /etc/luksvm/luksvm.conf
step config luksvm config check

running() {
    virsh -q -c $uri list --state-running --name | sed '/^$/d' | sort | tr '\n' ' '
}

expect_fail start-locked luksvm guest start mail
step open-imap cryptsetup open --key-file /etc/luksvm/keys/imap.key /dev/volgrp4/lvimap_hd0 cr_imap_encr
step open-web cryptsetup open --key-file /etc/luksvm/keys/web.key /dev/volgrp4/lvweb_hd0 cr_web
step start-mail luksvm guest start mail
step start-mail-again luksvm guest start mail
step start-web luksvm start --direct web
result running-before-stop "$(running)"

# Both ignore ACPI: both destroyed after about 10 s, at the same time.
step stop-both luksvm stop --direct mail web
result running-after-stop "$(running)"

printf '[guests]\nstop_timeout = 3s\n[guest:web]\non_timeout = fail\n[guest:mail]\non_timeout = managedsave\n' \
    > /etc/luksvm/luksvm.conf
step start-all luksvm start --direct --all
expect_fail stop-web-fail luksvm guest stop web
expect_fail close-web-held cryptsetup close cr_web
expect_fail stop-mail-managedsave luksvm guest stop mail
result running-after-policies "$(running)"
ls -A /var/lib/libvirt/qemu/save > save-dir.txt

for guest in mail web; do virsh -q -c $uri destroy "$guest"; done

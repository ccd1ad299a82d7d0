# Boot 1 of test_unattended.py: the seed host gets unattended keys. A Tang server on loopback;
# cr_imap_encr (guest mail) enrolled to the TPM2 (swtpm on the machine running QEMU) plus a
# recovery key, its keyfile's keyslot then removed (the header backups that still hold it are
# named by doctor and pruned); cr_web (guest web) enrolled to Tang; both keyfiles taken out of the
# configuration (key -) and off the disk. A third volume cr_other keeps its keyfile and has no
# guest: it must not notice the others' trouble. luksvm apply, luksvm.target enabled.

fast_kdf=(--type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000)
keys=/etc/luksvm/keys

# the package made /var/lib/tang (owner _tang); keys on first use of the image
ls /var/lib/tang/*.jwk > /dev/null 2>&1 || /usr/libexec/tangd-keygen /var/lib/tang
step tang-on systemctl enable --now tangd.socket
thp=$(tang-show-keys 80)
result thumbprint "$thp"

step other-lv lvcreate -q -y -n lvother_hd0 -L 32m volgrp4
head -c 64 /dev/urandom > $keys/other.key
chmod 0400 $keys/other.key
step luksformat-other cryptsetup luksFormat -q "${fast_kdf[@]}" --key-file $keys/other.key \
    /dev/volgrp4/lvother_hd0

install -d -m 0755 /etc/luksvm/crypttab.d
cat > /etc/luksvm/crypttab.d/10-mail-web.conf <<CONF
cr_imap_encr /dev/volgrp4/lvimap_hd0 $keys/imap.key luks,discard,x-luksvm.guest=mail
cr_web       /dev/volgrp4/lvweb_hd0  $keys/web.key  luks,discard,x-luksvm.guest=web
CONF
cat > /etc/luksvm/crypttab.d/20-other.conf <<CONF
cr_other /dev/volgrp4/lvother_hd0 $keys/other.key luks
CONF
cat > /etc/luksvm/luksvm.conf <<CONF
[guests]
stop_timeout = 5s

[keys]
unattended_timeout = 60s
CONF

ls /dev/tpmrm0 > tpm-device
step enroll-dry-run luksvm enroll cr_imap_encr --tpm2 --dry-run > enroll-dry-run.txt
step enroll-tpm2 luksvm enroll cr_imap_encr --tpm2 > enroll-tpm2.out
step enroll-tang luksvm enroll cr_web --tang http://127.0.0.1 --thumbprint "$thp" \
    > enroll-tang.out
# The recovery key is shown once, on a terminal (script(1) gives luksvm one).
step enroll-recovery script -qec "luksvm enroll cr_imap_encr --recovery-key" /dev/null \
    > recovery.out
grep -oE '[a-z]{8}(-[a-z]{8}){7}' recovery.out | head -1 | tr -d '\n' > recovery-key
expect_fail recovery-without-terminal luksvm enroll cr_imap_encr --recovery-key

# Key hygiene: the keyfile's keyslot goes; the backups taken before still hold it.
step remove-keyfile-slot luksvm enroll cr_imap_encr --remove 0 > remove.out
rc=0; luksvm doctor stale-backups > doctor-stale.txt || rc=$?
result doctor-stale-rc "$rc"
step prune luksvm header-backup --prune-stale cr_imap_encr > prune.txt
rc=0; luksvm doctor stale-backups > doctor-stale-after.txt || rc=$?
result doctor-stale-after-rc "$rc"
ls /var/lib/luksvm/header-backups/cr_imap_encr/ > backups-left.txt

# The keyfiles out of the configuration and off the disk: only the TPM2 and Tang keys remain.
sed -i "s|$keys/imap.key|-|; s|$keys/web.key|-|" /etc/luksvm/crypttab.d/10-mail-web.conf
rm -f $keys/imap.key $keys/web.key
cp /etc/luksvm/crypttab.d/10-mail-web.conf config-after.txt
step apply luksvm apply --take-over
step enable systemctl enable luksvm.target
step libvirt-guests-off systemctl disable libvirt-guests.service
# This Tang server runs on the host whose volume it unlocks (a real one is elsewhere on the
# network): its socket must listen before cr_web's unit asks.
install -d /etc/systemd/system/luksvm-unlock@cr_web.service.d
printf '[Unit]\nWants=tangd.socket\nAfter=tangd.socket\n' \
    > /etc/systemd/system/luksvm-unlock@cr_web.service.d/60-e2e-tang-on-this-host.conf
systemctl cat luksvm-unlock@cr_imap_encr.service luksvm-unlock@cr_web.service > units.txt
luksvm keys --json > keys-setup.json

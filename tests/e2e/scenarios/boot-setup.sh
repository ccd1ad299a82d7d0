# Boot 1 of test_boot.py: a luksvm host made from the seed host. Adds a third keyfile volume and
# guest (cr_spare/spare, on_timeout=fail) and a fourth volume with a passphrase, noauto (cr_pass/
# pass); writes the configuration, `luksvm apply --take-over`, enables luksvm.target and takes
# libvirt-guests out of the way. The next boot is the one under test.
# In: $E2E_IN/passphrase (no newline).

fast_kdf=(--type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000)
keys=/etc/luksvm/keys

step spare-lvs sh -c 'lvcreate -q -y -n lvspare_hd0 -L 32m volgrp4 &&
    lvcreate -q -y -n lvpass_hd0 -L 32m volgrp4'
head -c 64 /dev/urandom > $keys/spare.key
chmod 0400 $keys/spare.key
step luksformat-spare cryptsetup luksFormat -q "${fast_kdf[@]}" --key-file $keys/spare.key \
    /dev/volgrp4/lvspare_hd0
step luksformat-pass cryptsetup luksFormat -q "${fast_kdf[@]}" --key-file - \
    /dev/volgrp4/lvpass_hd0 < "$E2E_IN/passphrase"
spare_uuid=$(cryptsetup luksUUID /dev/volgrp4/lvspare_hd0)

# Guests like the seed's (no OS, they ignore ACPI; see define_guest).
define_guest spare "$(block_disk cr_spare)"
define_guest pass "$(block_disk cr_pass)"
# One guest with libvirt's autostart on: apply --take-over must clear it.
virsh -q -c qemu:///system autostart mail

install -d -m 0755 /etc/luksvm/crypttab.d
cat > /etc/luksvm/crypttab.d/10-mail-web.conf <<CONF
cr_imap_encr /dev/volgrp4/lvimap_hd0 $keys/imap.key luks,discard,x-luksvm.guest=mail
cr_web       /dev/volgrp4/lvweb_hd0  $keys/web.key  luks,discard,x-luksvm.guest=web
CONF
cat > /etc/luksvm/crypttab.d/20-spare.conf <<CONF
cr_spare UUID=$spare_uuid $keys/spare.key luks,x-luksvm.guest=spare
CONF
cat > /etc/luksvm/crypttab.d/30-pass.conf <<CONF
cr_pass /dev/volgrp4/lvpass_hd0 - luks,noauto,x-luksvm.guest=pass
CONF
cat > /etc/luksvm/luksvm.conf <<CONF
[guests]
stop_timeout = 10s

[guest:spare]
on_timeout = fail
CONF
step config-check luksvm config check
step apply luksvm apply --take-over
step enable systemctl enable luksvm.target
# libvirt-guests would act on the guests luksvm leaves running at shutdown (spare): out of the way.
step libvirt-guests-off systemctl disable libvirt-guests.service

virsh -q -c qemu:///system dominfo mail | sed -n 's/^Autostart: *//p' > mail-autostart
ls -R /etc/systemd/system/luksvm.target.wants > target-wants.txt
systemctl cat luksvm-unlock@cr_imap_encr.service luksvm-guest@mail.service > units.txt

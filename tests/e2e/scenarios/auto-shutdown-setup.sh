# Boot 1 of test_libvirt_auto_shutdown.py (libvirt >= 11.2): a luksvm host (cr_imap_encr/mail,
# cr_web/web, keyfiles, stop_timeout 5 s) whose admin turned on libvirt's own shutdown of guests
# in qemu.conf. doctor must FAIL and name the line; the guests run when this boot powers off, so
# boot 2's journal shows what libvirt did to them at shutdown.
uri=qemu:///system
running() {
    virsh -q -c $uri list --state-running --name | sed '/^$/d' | sort | tr '\n' ' '
}

install -d -m 0755 /etc/luksvm/crypttab.d
cat > /etc/luksvm/crypttab.d/10-seed.conf <<'CONF'
cr_imap_encr /dev/volgrp4/lvimap_hd0 /etc/luksvm/keys/imap.key luks,discard,x-luksvm.guest=mail
cr_web       /dev/volgrp4/lvweb_hd0  /etc/luksvm/keys/web.key  luks,discard,x-luksvm.guest=web
CONF
printf '[guests]\nstop_timeout = 5s\n' > /etc/luksvm/luksvm.conf
step apply luksvm apply --take-over
step enable systemctl enable luksvm.target
# libvirt-guests would act at shutdown too (libvirt warns of "dueling actions"): out of the way,
# so that what happens to the guests is libvirt's daemon or luksvm, nobody else.
step libvirt-guests-off systemctl disable libvirt-guests.service

# The admin's edit: libvirt powers off every running guest when the host shuts down.
echo 'auto_shutdown_poweroff = "all"' >> /etc/libvirt/qemu.conf
grep -n '^auto_shutdown_poweroff' /etc/libvirt/qemu.conf | cut -d: -f1 > poweroff-line
step restart-libvirtd systemctl restart libvirtd.service
step start-target systemctl start luksvm.target
result running "$(running)"

rc=0
luksvm doctor --json libvirt-shutdown > doctor-on.json 2> doctor-on.err || rc=$?
result doctor-on-rc "$rc"
rc=0
luksvm doctor libvirt-shutdown > doctor-on.txt 2>&1 || rc=$?
dpkg-query -W -f='${Package} ${Version}\n' libvirt-daemon systemd > versions.txt

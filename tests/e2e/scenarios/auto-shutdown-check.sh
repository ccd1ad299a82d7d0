# Boot 2 of test_libvirt_auto_shutdown.py: boot 1's shutdown is in the journal. The admin follows
# doctor's fix (auto_shutdown_poweroff back to none, restore off); doctor is clean; the guests run
# when this boot powers off, and the test reads that shutdown (luksvm's order) from the disk.
uri=qemu:///system
running() {
    virsh -q -c $uri list --state-running --name | sed '/^$/d' | sort | tr '\n' ' '
}

result running-at-boot "$(running)"
# who started the guests in this boot: luksvm's units, or libvirt restoring what it powered off
journalctl -b -o cat -u libvirtd.service > libvirtd-boot.txt || true

sed -i '/^auto_shutdown_poweroff/d' /etc/libvirt/qemu.conf
echo 'auto_shutdown_restore = 0' >> /etc/libvirt/qemu.conf
step restart-libvirtd systemctl restart libvirtd.service
wait_until 60 systemctl is-active --quiet luksvm-guest@mail.service luksvm-guest@web.service
result running "$(running)"
rc=0
luksvm doctor --json libvirt-shutdown > doctor-off.json 2> doctor-off.err || rc=$?
result doctor-off-rc "$rc"

# Boot 1 on the seed host: luksvm configured and applied, cr_imap_encr unlocked, the host's LVM
# activates the guest's vgmail inside it. doctor must FAIL guest-vg-leak and print the fix; the
# scenario then applies exactly the printed global_filter line (as an admin would paste it).

install -d -m 0755 /etc/luksvm/crypttab.d
cat > /etc/luksvm/crypttab.d/10-seed.conf <<'CONF'
cr_imap_encr /dev/volgrp4/lvimap_hd0 /etc/luksvm/keys/imap.key luks,discard,x-luksvm.guest=mail
cr_web       /dev/volgrp4/lvweb_hd0  /etc/luksvm/keys/web.key  luks,discard,x-luksvm.guest=web
CONF
# the seed's guests have no OS and ignore ACPI: keep the shutdown of the next boot short
printf '[guests]\nstop_timeout = 5s\n' > /etc/luksvm/luksvm.conf
step apply luksvm apply
step enable systemctl enable luksvm.target
step unlock luksvm unlock --no-start cr_imap_encr
step settle udevadm settle
# LVM's event activation (lvm-activate-vgmail) takes the guest VG a moment after the mapping opens
step vgmail-active wait_until 60 sh -c 'lvs --noheadings -o lv_active vgmail/root | grep -q active'

rc=0
luksvm doctor --json guest-vg-leak > before.json || rc=$?
result before-rc "$rc"
luksvm doctor guest-vg-leak > before.txt || true
rc=0
luksvm doctor --json > all-before.json || rc=$?
result all-before-rc "$rc"

python3 - <<'PY' > filter-line
import json

finding = next(f for f in json.load(open("before.json")) if f["subject"] == "cr_imap_encr")
line = next(l.strip() for l in finding["fix"].splitlines() if l.strip().startswith("global_filter"))
conf = open("/etc/lvm/lvm.conf").read()
open("/etc/lvm/lvm.conf", "w").write(conf.replace("devices {", "devices {\n\t" + line, 1))
print(line)
PY
# the check the fix asks for: pvs -a lists only the host's own PVs now
pvs -a --reportformat json -o pv_name > pvs-a.json
# (the harness boots its kernel and initrd from outside the image, so the initramfs copy of
# lvm.conf that the fix also mentions plays no part in this VM)

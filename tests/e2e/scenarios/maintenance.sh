# Maintenance on the seed host with luksvm applied, in one boot: the header-backup and trim units
# (valid; the timer fires a missed run; the service backs up both volumes, then writes nothing
# new), `luksvm trim` and its discard chain against what the kernel and libvirt really do, and
# the refusal of a backup dir that lives inside an encrypted volume.
uri=qemu:///system
install -d /etc/luksvm/crypttab.d
# cr_web without `discard`: its dm-crypt link must break.
cat > /etc/luksvm/crypttab.d/10-seed.conf <<'CONF'
cr_imap_encr /dev/volgrp4/lvimap_hd0 /etc/luksvm/keys/imap.key luks,discard,x-luksvm.guest=mail
cr_web       /dev/volgrp4/lvweb_hd0  /etc/luksvm/keys/web.key  luks,x-luksvm.guest=web
CONF
printf '[guests]\nstop_timeout = 5s\n' > /etc/luksvm/luksvm.conf
step apply luksvm apply

# --- the units ------------------------------------------------------------------------------
units=(luksvm-header-backup.service luksvm-header-backup.timer luksvm-trim.service luksvm-trim.timer)
systemd-analyze verify --man=no "${units[@]/#//etc/systemd/system/}" > verify.txt 2>&1 || echo "rc=$?" >> verify.txt
step enable-timers systemctl enable luksvm-header-backup.timer luksvm-trim.timer
systemctl show -p Persistent,TimersCalendar luksvm-header-backup.timer > backup-timer.txt

# A run missed while the host was off (stamp two weeks old) happens as soon as the timer starts.
# Without the random delay, so that "as soon" is now.
install -d /etc/systemd/system/luksvm-header-backup.timer.d
printf '[Timer]\nRandomizedDelaySec=0\n' > /etc/systemd/system/luksvm-header-backup.timer.d/e2e.conf
install -d /var/lib/systemd/timers
touch -d '14 days ago' /var/lib/systemd/timers/stamp-luksvm-header-backup.timer
systemctl daemon-reload
step timer-start systemctl start luksvm-header-backup.timer
backup_ran() {
    local svc=luksvm-header-backup.service
    [ "$(systemctl show -p ActiveState --value $svc)" = inactive ] &&
        [ "$(systemctl show -p ExecMainExitTimestampMonotonic --value $svc)" -gt 0 ]
}
step timer-fired wait_until 120 backup_ran
systemctl show -p Result,ExecMainStatus luksvm-header-backup.service > backup-service-1.txt

list_backups() {
    local dir=/var/lib/luksvm/header-backups file
    for file in "$dir"/*/*.luksheader; do
        local rc=0
        cryptsetup isLuks "$file" || rc=$?
        printf '%s\t%s\t%s\t%s\n' "${file#"$dir"/}" "$rc" "$(cryptsetup luksUUID "$file")" \
            "$(stat -c %a "$file")"
    done
}
list_backups > backups-1.tsv
stat -c '%n %a' /var/lib/luksvm/header-backups /var/lib/luksvm/header-backups/* > backup-modes.txt
step backup-again systemctl start luksvm-header-backup.service
list_backups > backups-2.tsv
find /var/lib/luksvm/header-backups -type f -printf '%P\n' | sort > backup-files-2.txt

# --- trim and the discard chain -------------------------------------------------------------
step unlock systemctl start luksvm-unlock@cr_imap_encr.service luksvm-unlock@cr_web.service
step settle udevadm settle
# What the kernel and dm-crypt say, to judge luksvm's report by.
for name in cr_imap_encr cr_web; do
    dm=$(basename "$(readlink -f /dev/mapper/$name)")
    lv=$(ls /sys/block/$dm/slaves)
    disk=$(ls /sys/block/$lv/slaves)
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" \
        "$(cat /sys/block/$dm/queue/discard_max_bytes)" "$(cat /sys/block/$lv/queue/discard_max_bytes)" \
        "$(cat /sys/block/$disk/queue/discard_max_bytes)" \
        "$(dmsetup table $name | grep -c allow_discards || true)"
done > discard-facts.tsv

redefine() {  # redefine GUEST with or without discard='unmap' on its disk's driver
    virsh -q -c $uri dumpxml --inactive "$1" | sed "s/ discard='unmap'//" > "/tmp/$1.xml"
    if [ "$2" = with ]; then
        sed -i "s|<driver name='qemu' type='raw'|<driver name='qemu' type='raw' discard='unmap'|" "/tmp/$1.xml"
    fi
    virsh -q -c $uri define "/tmp/$1.xml" > /dev/null
}
trim() {  # trim NAME: luksvm trim --json into NAME.json, its exit code into NAME.rc
    local rc=0
    luksvm trim --json > "$1.json" || rc=$?
    echo "$rc" > "$1.rc"
}
for guest in mail web; do redefine $guest without; done
trim trim-without-unmap
for guest in mail web; do redefine $guest with; done
virsh -q -c $uri dumpxml mail | grep "<driver" > mail-driver.xml
trim trim-with-unmap
# The weekly unit: exit 1 (cr_web's chain is still broken) is a report, not a failure.
rc=0
systemctl start luksvm-trim.service || rc=$?
result trim-service-rc "$rc"
# A running guest without a guest agent: the real libvirt error must read as "agent missing".
step start-mail virsh -q -c $uri start mail
trim trim-running
step destroy-mail virsh -q -c $uri destroy mail

# --- a backup dir inside an encrypted volume --------------------------------------------------
# The guest's own filesystem, inside cr_imap_encr (the host may have auto-activated vgmail already).
step guest-vg-on vgchange -ay vgmail
install -d /mnt/mailroot
step mount-guest-fs mount /dev/vgmail/root /mnt/mailroot
printf '[guests]\nstop_timeout = 5s\n[backup]\ndir = /mnt/mailroot/luksvm-backups\n' > /etc/luksvm/luksvm.conf
expect_fail backup-on-volume luksvm header-backup
rc=0
systemctl start luksvm-header-backup.service || rc=$?
result backup-service-on-volume-rc "$rc"
test ! -e /mnt/mailroot/luksvm-backups && result backup-dir-created no || result backup-dir-created yes
step umount umount /mnt/mailroot
step guest-vg-off vgchange -an vgmail
printf '[guests]\nstop_timeout = 5s\n' > /etc/luksvm/luksvm.conf

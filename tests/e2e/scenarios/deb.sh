# luksvm from its Debian package on the seed host (which has it from pip): install, remove and
# install a newer revision while a volume is unlocked and a guest runs through luksvm's units.
# Nothing the package does may start, stop, restart, unlock or lock anything. In: $E2E_IN/
# luksvm_VERSION-1_all.deb and luksvm_VERSION-2_all.deb. The VM has no network: apt takes every
# dependency from the image (tests/e2e/image.py PACKAGES).

old=$(ls "$E2E_IN"/luksvm_*-1_all.deb)
new=$(ls "$E2E_IN"/luksvm_*-2_all.deb)
units="luksvm.target luksvm-header-backup.timer luksvm-metrics.timer luksvm-trim.timer
    luksvm-unlock@cr_web.service luksvm-guest@web.service"

apt_get() {
    DEBIAN_FRONTEND=noninteractive apt-get -q -y --no-install-recommends "$@"
}

# state LABEL: each unit's enablement, active state and invocation ID (new on every start or
# restart), the volume, the guest and the package, into state-LABEL (tab-separated).
state() {
    local unit enabled
    hash -r  # `command -v` below looks again, not in bash's table
    {
        for unit in $units; do
            enabled=$(systemctl is-enabled "$unit" 2>/dev/null || true)
            printf '%s\t%s\t%s\t%s\n' "$unit" "${enabled:--}" \
                "$(systemctl show -P ActiveState "$unit")" "$(systemctl show -P InvocationID "$unit")"
        done
        if [ -e /dev/mapper/cr_web ]; then printf 'volume\topen\n'; else printf 'volume\tclosed\n'; fi
        printf 'guest\t%s\n' "$(virsh -q -c qemu:///system domstate web)"
        printf 'package\t%s\n' \
            "$(dpkg-query -W -f='${db:Status-Abbrev}${Version}' luksvm 2>/dev/null || echo absent)"
        printf 'command\t%s\n' "$(command -v luksvm || echo absent)"
        printf 'conf\t%s\n' "$(sha256sum /etc/luksvm/luksvm.conf 2>/dev/null | cut -c1-16)"
    } > "state-$1"
}

step pip-uninstall pip uninstall -y -q --break-system-packages --disable-pip-version-check luksvm
state before

step install apt_get install "$old"
state installed
luksvm --version > version.txt
python3 -c 'import luksvm; print(luksvm.__file__)' > module.txt

# A luksvm host: one volume and its guest, started through luksvm.target.
cat > /etc/luksvm/crypttab.d/10-web.conf <<'CONF'
cr_web /dev/volgrp4/lvweb_hd0 /etc/luksvm/keys/web.key luks,discard,x-luksvm.guest=web
CONF
# the [guests] setting (the first; a commented [guest:NAME] example follows)
sed -i '0,/^#stop_timeout = .*/s//stop_timeout = 3s/' /etc/luksvm/luksvm.conf
grep -q '^stop_timeout = 3s' /etc/luksvm/luksvm.conf
step apply luksvm apply
# luksvm.target is not ordered after its guest units (DefaultDependencies=no, nothing waits on
# guest starts): name the guest unit too, so that the job returns once the guest runs
step start-target systemctl start luksvm.target luksvm-guest@web.service
state running

# Removal, then the newer revision: dpkg configures it as an upgrade from the removed one
# (postinst gets its version). The in-place upgrade is tested on the host tier (dpkg --root).
step remove apt_get remove luksvm
state removed
step upgrade apt_get install "$new"
state upgraded

# The units work from the newer package: the guest (no OS, ignores ACPI) destroyed after
# stop_timeout, the volume locked.
step stop-target systemctl stop luksvm.target luksvm-unlock@cr_web.service
state stopped

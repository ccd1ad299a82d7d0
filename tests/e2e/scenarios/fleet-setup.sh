# Many hosts, first boot: the collection installed from its galaxy tarball, the playbook (role
# luksvm.host.luksvm and modules, connection local) sets the seed host up from nothing but
# variables; then luksvm.target runs now, so that this boot's shutdown stops the guests (they
# have no OS, ignore ACPI and are destroyed by policy after stop_timeout).
step galaxy-install ansible-galaxy collection install -p /usr/share/ansible/collections \
    "$E2E_IN"/luksvm-host-*.tar.gz
package=$(ls "$E2E_IN"/luksvm-*.whl)
# pipelining: one process per task, without copying, chmod-ing and removing a module file
export ANSIBLE_NOCOLOR=1 ANSIBLE_LOCALHOST_WARNING=false ANSIBLE_INVENTORY_UNPARSED_WARNING=false
export ANSIBLE_PIPELINING=1
step first-run ansible-playbook -i localhost, -c local -e "@$E2E_IN/vars.json" \
    -e "luksvm_package=$package" "$E2E_IN/site.yml" > first-run.txt 2>&1 || {
    cat first-run.txt
    exit 1
}
systemctl is-enabled luksvm.target luksvm-metrics.timer > enabled.txt
# libvirt-guests would act on the guests at shutdown too (as in boot-setup.sh): out of the way.
step libvirt-guests-off systemctl disable libvirt-guests.service
# luksvm.target is not ordered after its guest units (DefaultDependencies=no, nothing waits on
# guest starts): name the guest units too, so that the job returns once the guests run
step start-target systemctl start luksvm.target luksvm-guest@mail.service luksvm-guest@web.service
luksvm status --json > status-1.json

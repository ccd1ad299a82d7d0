# Many hosts, second boot: the guests came up by themselves; the same playbook changes nothing;
# node_exporter serves luksvm's metrics (with the last shutdown's destroyed guests) over loopback
# HTTP. (Check mode with a changed variable is tests/integration/test_ansible.py's: the role's
# tasks are the same there, and each of them costs seconds under emulation.)
# pipelining: one process per task, without copying, chmod-ing and removing a module file
export ANSIBLE_NOCOLOR=1 ANSIBLE_LOCALHOST_WARNING=false ANSIBLE_INVENTORY_UNPARSED_WARNING=false
export ANSIBLE_PIPELINING=1
package=$(ls "$E2E_IN"/luksvm-*.whl)
guests_running() {
    [ "$(virsh -q -c qemu:///system list --state-running --name | sed '/^$/d' | wc -l)" -eq 2 ]
}
step guests-up wait_until 120 guests_running
luksvm status --json > status-boot.json
play() {
    ansible-playbook -i localhost, -c local -e "@$E2E_IN/vars.json" -e "luksvm_package=$package" \
        "$@" "$E2E_IN/site.yml"
}
step second-run play > second-run.txt 2>&1 || { cat second-run.txt; exit 1; }

step metrics systemctl start luksvm-metrics.service
scrape() {
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:9100/metrics", timeout=10).read().decode())'
}
step node-exporter-up wait_until 60 scrape > /dev/null
scrape > scrape.txt
luksvm status --json > status.json

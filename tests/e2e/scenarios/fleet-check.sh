# Many hosts, second boot: the guests came up by themselves; the same playbook changes nothing;
# check mode with a changed variable (the role alone) shows the diff and changes nothing; node_exporter serves
# luksvm's metrics (with the last shutdown's destroyed guests) over loopback HTTP.
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
snapshot() { find /etc/luksvm /etc/systemd/system -type f -print0 | sort -z | xargs -0 sha256sum; }
snapshot > before-check.txt
step check-run ansible-playbook -i localhost, -c local --check --diff -e "@$E2E_IN/vars.json" \
    -e "@$E2E_IN/vars-changed.json" "$E2E_IN/check.yml" > check-run.txt 2>&1 || {
    cat check-run.txt
    exit 1
}
snapshot > after-check.txt

step metrics systemctl start luksvm-metrics.service
scrape() {
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:9100/metrics", timeout=10).read().decode())'
}
step node-exporter-up wait_until 60 scrape > /dev/null
scrape > scrape.txt
luksvm status --json > status.json

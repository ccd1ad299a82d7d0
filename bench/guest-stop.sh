# Benchmark, run inside the e2e VM (seed host) by bench/guest-stop.py: stopping N guests that
# ignore ACPI (no OS: they sit in SeaBIOS), each given T seconds, by
#   luksvm-units     systemctl stop luksvm-guest@b1..bN (the units luksvm apply writes; they adopt
#                    the running guests untimed first)
#   luksvm-direct    luksvm stop --direct b1..bN (one process, one thread per guest)
#   luksvm-procs     N `luksvm guest stop bI` processes at once (what the units' ExecStop run)
#   libvirt-guests   systemctl stop libvirt-guests with its defaults except ON_SHUTDOWN=shutdown
#                    and SHUTDOWN_TIMEOUT=T (PARALLEL_SHUTDOWN=0: one guest after the other)
#   libvirt-guests-parallel   the same with PARALLEL_SHUTDOWN=N
# Each line of bench.tsv: method, seconds, guests still running afterwards.
N=${BENCH_N:-4}
T=${BENCH_T:-10}
uri=qemu:///system
guests=()
for i in $(seq 1 "$N"); do guests+=("b$i"); done

options=luks
for g in "${guests[@]}"; do options+=",x-luksvm.guest=$g"; done
install -d /etc/luksvm/crypttab.d
echo "cr_web /dev/volgrp4/lvweb_hd0 /etc/luksvm/keys/web.key $options" \
    > /etc/luksvm/crypttab.d/10-bench.conf
printf '[guests]\nstop_timeout = %ss\non_timeout = destroy\n' "$T" > /etc/luksvm/luksvm.conf
luksvm config check
cryptsetup open --key-file /etc/luksvm/keys/web.key /dev/volgrp4/lvweb_hd0 cr_web

for g in "${guests[@]}"; do
    define_guest "$g" "" 32  # no disk: the volume only ties the guest to a unit
done

running() {
    virsh -q -c $uri list --state-running --name | grep -c '^b' || true
}

start_all() {
    luksvm start --direct "${guests[@]}"
    test "$(running)" -eq "$N"
}

# measure METHOD CMD...: start the guests (and, with $prepare set, run it untimed), then time CMD.
measure() {
    local method=$1 start end
    shift
    start_all
    if [ -n "${prepare:-}" ]; then $prepare; fi
    start=$(now_ms)
    "$@" || echo "bench: $method exited $?"
    end=$(now_ms)
    local still
    still=$(running)
    printf '%s\t%s\t%s\n' "$method" "$(((end - start) / 1000)).$(((end - start) % 1000 / 100))" \
        "$still" | tee -a "$E2E_RESULTS/bench.tsv"
    for g in "${guests[@]}"; do virsh -q -c $uri destroy "$g" 2> /dev/null || true; done
}

parallel_processes() {
    local pids=()
    for g in "${guests[@]}"; do
        luksvm guest stop "$g" &
        pids+=($!)
    done
    local rc=0
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    return $rc
}

# Configure libvirt-guests while no guest runs (a restart stops every running guest).
libvirt_guests_with() {
    printf 'ON_BOOT=ignore\nON_SHUTDOWN=shutdown\nSHUTDOWN_TIMEOUT=%s\nPARALLEL_SHUTDOWN=%s\n' \
        "$T" "$1" > /etc/default/libvirt-guests
    systemctl restart libvirt-guests
}

: > "$E2E_RESULTS/bench.tsv"
# apply first: on a pip install (the seed host) it is apply that installs the unit templates.
if luksvm apply > /dev/null && systemctl cat luksvm-guest@.service > /dev/null 2>&1; then
    units=()
    for g in "${guests[@]}"; do units+=("luksvm-guest@$g.service"); done
    # the units adopt the running guests untimed; the stop is what is measured
    prepare="systemctl start ${units[*]}" measure luksvm-units systemctl stop "${units[@]}"
fi
measure luksvm-direct luksvm stop --direct "${guests[@]}"
measure luksvm-procs parallel_processes
libvirt_guests_with 0
measure libvirt-guests systemctl stop libvirt-guests
libvirt_guests_with "$N"
measure libvirt-guests-parallel systemctl stop libvirt-guests
cat "$E2E_RESULTS/bench.tsv"

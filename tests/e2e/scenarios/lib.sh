# Helpers every scenario script has: the runner loads this file, then runs the scenario with
# `bash -euo pipefail`. Environment: E2E_RESULTS (also $1) is the directory whose files the test
# reads back; E2E_IN holds the files the test passed in; E2E_BOOT is the boot number (1, 2, ...).

# now_ms: wall clock in milliseconds
now_ms() {
    local t=${EPOCHREALTIME/./}
    echo $((t / 1000))
}

# step NAME CMD...: run CMD; record "NAME<TAB>rc<TAB>ms" in $E2E_RESULTS/steps.tsv (the test reads
# it as result.steps) and print "E2E-STEP NAME rc=.. ms=..". Returns CMD's status, so under
# `set -e` a failing step ends the scenario.
step() {
    local name=$1 start rc=0
    shift
    start=$(now_ms)
    "$@" || rc=$?
    local ms=$(($(now_ms) - start))
    printf '%s\t%d\t%d\n' "$name" "$rc" "$ms" >> "$E2E_RESULTS/steps.tsv"
    echo "E2E-STEP $name rc=$rc ms=$ms"
    return "$rc"
}

# expect_fail NAME CMD...: a step whose command must fail; its stderr is kept in NAME.err.
expect_fail() {
    local name=$1 rc=0
    step "$@" 2> "$E2E_RESULTS/$name.err" || rc=$?
    cat "$E2E_RESULTS/$name.err" >&2
    if [ "$rc" -eq 0 ]; then
        echo "E2E-FAIL: step $name succeeded, but it was expected to fail" >&2
        return 1
    fi
}

# result NAME VALUE...: write VALUE to $E2E_RESULTS/NAME (read back with result.text(NAME)).
result() {
    local name=$1
    shift
    printf '%s\n' "$*" > "$E2E_RESULTS/$name"
}

# wait_until SECONDS CMD...: retry CMD every 0.2 s until it succeeds; fail after SECONDS.
wait_until() {
    local deadline=$(($(now_ms) + $1 * 1000))
    shift
    until "$@"; do
        if [ "$(now_ms)" -ge "$deadline" ]; then
            echo "E2E-FAIL: timed out waiting for: $*" >&2
            return 1
        fi
        sleep 0.2
    done
}

# block_disk MAPPING [DRIVER_ATTRIBUTES]: the <disk> of a guest whose disk is /dev/mapper/MAPPING
# (raw, cache=none, io=native, plus DRIVER_ATTRIBUTES such as "discard='unmap'").
block_disk() {
    cat <<XML
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'${2:+ $2}/>
      <source dev='/dev/mapper/$1'/>
      <target dev='vda' bus='virtio'/>
    </disk>
XML
}

# define_guest NAME DEVICES [MEMORY_MIB]: define (as step define-NAME) a guest with no OS (it sits
# in SeaBIOS and ignores ACPI), type qemu (no KVM in the VM), no graphics, a serial console and
# DEVICES (XML text). Its XML stays in /tmp/NAME.xml. A disk whose first sector ends in 55 AA is
# booted: give it a boot code that halts (see seed.sh), or its vCPU spins.
define_guest() {
    cat > "/tmp/$1.xml" <<XML
<domain type='qemu'>
  <name>$1</name>
  <memory unit='MiB'>${3:-64}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
$2
    <serial type='pty'/>
  </devices>
</domain>
XML
    step "define-$1" virsh -q -c qemu:///system define "/tmp/$1.xml"
}

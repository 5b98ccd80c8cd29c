#!/usr/bin/env bash
# testhost.sh [OPTIONS] -- COMMAND [ARGS...]
#
# Runs COMMAND inside the nested test host and exits with COMMAND's exit status.
#
# The test host ("L1") is QEMU in TCG mode with -cpu EPYC (a CPU model with AMD SVM), booting the
# installed Debian kernel with a small cached initramfs (busybox, virtio-pci + 9p modules, kvm_amd and
# its dependencies, tun for tap devices). Its /init loads kvm_amd (a real /dev/kvm inside), mounts
# this machine's root filesystem read-only over virtio-9p, mounts proc, sys, devtmpfs, devpts, and
# tmpfs on /tmp, /run, /dev/shm over it, mounts every --rw directory read-write at its own path, and
# runs COMMAND chrooted there, in the current working directory, with stdin from /dev/null and a
# clean environment (PATH includes /opt/swift/usr/bin and the python3 interpreter's directory; HOME
# is kept, read-only).
# COMMAND's stdout/stderr are streamed to this script's stdout/stderr while it runs.
# Kernel modules not in the initramfs can be loaded from COMMAND with modprobe (the host's
# /lib/modules is visible and the L1 kernel is the same version).
#
# Options:
#   --timeout SECONDS  hard limit for the whole session, boot included (default 600); QEMU is killed
#   --mem SIZE         L1 memory (default 2G: room for a 256M-1G L2 guest, its VMM, and tmpfs)
#   --cpus N           L1 vCPUs (default 2, multi-threaded TCG: one host thread per vCPU; see
#                      TESTHOST_TCG_THREAD)
#   --rw DIR           mount DIR read-write at the same path (repeatable). The repository around
#                      this script is always mounted read-write. DIR must exist.
#   --env NAME[=VALUE] pass an environment variable to COMMAND (repeatable; no value: current value)
#   --no-stream        print COMMAND's output only after the session ended
#   --keep             keep the session directory (console log, QEMU stderr) and print its path
#   -h, --help         this text
#
# Exit status: COMMAND's status; 124 if the timeout hit while COMMAND ran; 125 if the test host
# itself failed (did not boot within the timeout, kvm_amd/`/dev/kvm` missing, a mount failed, its
# kernel locked up: a "BUG: soft lockup" on its console, a hung task or RCU stall its /init's watchdog
# reports, or 180 s (TESTHOST_SILENCE) without that watchdog's heartbeat end the session at once, with the test host's
# processes, blocked tasks and kernel log printed; or its kernel panicked, "its kernel panicked (WHY)"):
# then a message says which and the last 40 lines of the L1 console are printed on stderr.
# Environment: SWIFTVMM_CACHE (cache root, default ~/.cache/swiftvmm), TESTHOST_QEMU (qemu binary;
# default: QEMU 10 from bookworm-backports, fetched into the cache, see lib/deps.sh testhost_qemu),
# TESTHOST_CPU (L1 CPU model, default EPYC; e.g. "qemu64,-svm" to test the failure path).
# TESTHOST_SILENCE (seconds without a heartbeat on the console that end a session, default 180).
# TESTHOST_QEMU_VERSION (the bookworm-backports version of qemu-system-x86 to fetch; default the one tested).
# TESTHOST_TCG_THREAD (multi, the default, or single: QEMU's -accel tcg,thread=). With multi (a host thread
# per vCPU), bookworm's QEMU 7.2 livelocks the test host's kernel when it patches its own code while
# the other vCPU runs it (text_poke_bp's int3s, e.g. a static key KVM toggles as VMs come and go):
# both vCPUs loop through the int3 handler, a soft lockup or a silent console; toggling
# sched_schedstats while both vCPUs schedule reproduces it in under a minute. QEMU 10.0 (the default
# since 2026-12-06) did not lock up in 150 s of that. single survives it too, but a Linux guest under
# swiftvmm in the test host did not boot within 300 s with it (README, "The test host").
# TESTHOST_NPT (1, the default: kvm_amd in the test host uses nested paging; 0: shadow paging).
# With nested paging, QEMU's TCG emulation of SVM (7.2 and 10.0 alike) sometimes ends a guest (L2)
# in a triple fault on its first entry after a nested page fault, I/O or MSR exit (seen with L1
# ftrace; restored guests, with cold nested page tables, hit it most: 2 to 3 of 30 stress clones;
# 0 of 30 with npt=0, which is otherwise untried in the e2e suite); the e2e harness (per case) and
# the kit's plugin (per test) run it once more when the test host's trace shows that
# (python/swiftvmm_kit/l1trace.py). README, "The test host".
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
timeout_s=600 mem=2G cpus=2 stream=1 keep=0 silence=${TESTHOST_SILENCE:-180}
rw_dirs=() env_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --timeout) timeout_s=${2:?}; shift 2 ;;
        --mem) mem=${2:?}; shift 2 ;;
        --cpus) cpus=${2:?}; shift 2 ;;
        --rw) rw_dirs+=("${2:?}"); shift 2 ;;
        --env) env_args+=("${2:?}"); shift 2 ;;
        --no-stream) stream=0; shift ;;
        --keep) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) echo "testhost.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || { echo "usage: testhost.sh [--timeout S] [--mem SIZE] [--rw DIR]... -- COMMAND [ARGS...]" >&2; exit 2; }
case ${TESTHOST_NPT:-1} in 0|1) ;; *) echo "testhost.sh: TESTHOST_NPT must be 0 or 1" >&2; exit 2 ;; esac
tcg_thread=${TESTHOST_TCG_THREAD:-multi}
case $tcg_thread in single|multi) ;; *) echo "testhost.sh: TESTHOST_TCG_THREAD must be single or multi" >&2; exit 2 ;; esac
case $timeout_s in ''|*[!0-9]*) echo "testhost.sh: --timeout needs whole seconds" >&2; exit 2 ;; esac
case $silence in ''|*[!0-9]*) echo "testhost.sh: TESTHOST_SILENCE needs whole seconds" >&2; exit 2 ;; esac
# shellcheck source=guest-tests/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
ensure_deps
kver=$(kernel_version)
say() { echo "testhost: $*" >&2; }

# ---------------------------------------------------------------------------------------------
# The L1 initramfs, cached per kernel version and per content of this script.
# tun: /dev/net/tun for the tap devices of the virtio-net tests (guest-tests/e2e/virtio_net_driver.py).
L1_MODULES=(virtio_pci 9pnet_virtio 9p kvm_amd tun)
l1dir=$CACHE_ROOT/testhost
mkdir -p "$l1dir"
l1=$l1dir/initramfs-$kver.cpio.gz
key=$( { cat "${BASH_SOURCE[0]}" "$GT_DIR/lib/common.sh"; echo "$kver"; dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || true; } | sha256sum | cut -c1-32)
exec 8> "$l1dir/.lock"
flock 8
qemu=${TESTHOST_QEMU:-$(testhost_qemu "$l1dir")}
if [ ! -f "$l1" ] || [ "$(cat "$l1.key" 2>/dev/null)" != "$key" ]; then
    say "building the L1 initramfs for $kver"
    root=$(mktemp -d "${TMPDIR:-/tmp}/swiftvmm-l1.XXXXXX")
    mkdir -p "$root"/{bin,dev,proc,sys,host,ctl,modules}
    cp /bin/busybox "$root/bin/busybox"
    for app in $(/bin/busybox --list); do [ "$app" = busybox ] || ln -s busybox "$root/bin/$app"; done
    mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
    i=10
    while read -r m; do
        f=$(install_module "$m" "$root/modules")
        mv "$root/modules/$f" "$root/modules/$i-$f"
        i=$((i + 1))
    done < <(module_closure "$kver" "${L1_MODULES[@]}")
    cat > "$root/init" <<'INIT'
#!/bin/sh
# L1 test host /init (guest-tests/testhost.sh)
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
log() { echo "testhost-l1: $*"; }
die() {
    log "FAILED: $*"
    [ -d /ctl/.ok ] && echo "$*" > /ctl/host-error
    sync; poweroff -f; sleep 10
}
log "init started, loading modules"
for m in /modules/*.ko; do case $m in *-kvm[-_]amd.ko) ;; *) insmod "$m" || log "insmod $m failed" ;; esac; done
o=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$o" ctl /ctl || die "cannot mount the control share (virtio-9p)"
mkdir -p /ctl/.ok
. /ctl/config
for m in /modules/*-kvm[-_]amd.ko; do insmod "$m" npt="${KVM_AMD_NPT:-1}" || log "insmod $m failed"; done
# The kernel's text symbols, for naming where a locked-up vCPU was (tools/l1-state.py); asked for
# once per kernel version (nokaslr: they hold from one session to the next).
if [ -f /ctl/want-kallsyms ]; then
    grep -E '^[0-9a-f]+ [tT] ' /proc/kallsyms > /ctl/kallsyms.tmp && mv /ctl/kallsyms.tmp /ctl/kallsyms
fi
mount -t 9p -o "$o,ro,cache=loose" hostroot /host || die "cannot mount the host root filesystem over 9p"
mount -t proc proc /host/proc || die "cannot mount /proc"
mount -t sysfs sysfs /host/sys || die "cannot mount /sys"
mount -t devtmpfs devtmpfs /host/dev || die "cannot mount /dev"
mkdir -p /host/dev/pts /host/dev/shm
# devtmpfs has no /dev/fd (bash process substitution needs it), /dev/std*.
ln -sf /proc/self/fd /host/dev/fd
ln -sf /proc/self/fd/0 /host/dev/stdin
ln -sf /proc/self/fd/1 /host/dev/stdout
ln -sf /proc/self/fd/2 /host/dev/stderr
mount -t devpts -o newinstance,ptmxmode=0666 devpts /host/dev/pts || log "no devpts"
mount -t tmpfs -o mode=1777 shm /host/dev/shm
# The kernel's trace events: the e2e harness reads KVM's to tell the emulator's triple faults of a
# guest from the guest's own (python/swiftvmm_kit/l1trace.py).
mount -t tracefs tracefs /host/sys/kernel/tracing || log "no tracefs"
mount -t tmpfs -o mode=1777 tmp /host/tmp || die "cannot mount /tmp"
mount -t tmpfs -o mode=755 run /host/run || die "cannot mount /run"
while read -r tag path; do
    mkdir -p "/host$path" 2>/dev/null
    mount -t 9p -o "$o,cache=mmap" "$tag" "/host$path" || die "cannot mount $path read-write (9p tag $tag)"
done < /ctl/rw.list
mkdir -p "/host$CTL_PATH" 2>/dev/null
mount --bind /ctl "/host$CTL_PATH" || die "cannot bind the control share at $CTL_PATH"
log "filesystems mounted"
# Diagnostics on the console (not over 9p, which may be what hangs): every user process (state, the
# kernel function it waits in, per thread), the kernel stacks of tasks in uninterruptible sleep, and
# the kernel log's tail. Written once when the kernel reports a hung task or an RCU stall, and once
# shortly before the session's timeout (testhost.sh prints them when the session times out).
diag() {
    log "==== diagnostics: $1 (uptime $(cut -d' ' -f1 /proc/uptime) s) ===="
    for d in /proc/[0-9]*; do
        read -r stat 2>/dev/null < "$d/stat" || continue
        rest=${stat##*) }; state=${rest%% *}; comm=${stat#*(}; comm=${comm%)*}
        ppid=${rest#* }; ppid=${ppid%% *}
        # Kernel threads (children of kthreadd, pid 2) only when blocked.
        { [ "$ppid" != 2 ] && [ "${d#/proc/}" != 2 ]; } || [ "$state" = D ] || continue
        # Per thread: id:state:wait channel; the kernel stacks of those in D state follow the line.
        threads= blocked=
        for t in "$d"/task/*; do
            read -r ts 2>/dev/null < "$t/stat" || continue
            tstate=${ts##*) }; tstate=${tstate%% *}
            threads="$threads${t##*/}:$tstate:$(cat "$t/wchan" 2>/dev/null) "
            [ "$tstate" = D ] && blocked="$blocked $t"
        done
        log "pid ${d#/proc/} ppid $ppid $state $comm: $threads"
        for t in $blocked; do sed "s/^/testhost-l1:   ${t##*/} /" "$t/stack" 2>/dev/null; done
    done
    dmesg | tail -n 40 | sed 's/^/testhost-l1: dmesg: /'
    # The Python stacks of the harness processes that asked for it (guest-tests/e2e/guestrun.py).
    while read -r p; do
        read -r stat 2>/dev/null < "/proc/$p/stat" || continue
        case $stat in *"(python"*) log "python stacks of pid $p:"; kill -USR1 "$p"; sleep 2 ;; esac
    done 2>/dev/null < /host/run/testhost-pystacks
    log "==== end of diagnostics ===="
}
# The watchdog: a heartbeat line every 30 s (testhost.sh ends a session whose console stays silent
# for 180 s: the kernel hung outright), and the kernel's own reports of a stall, which also end it.
(
    waited=0
    while sleep 30; do
        waited=$((waited + 30))
        log "heartbeat $(cut -d' ' -f1 /proc/uptime)"
        stall=$(dmesg | grep -m 1 -E 'blocked for more than|rcu_.*detected stalls?|self-detected stall')
        if [ -n "$stall" ]; then
            diag "the kernel reported a hung task or an RCU stall"
            log "KERNEL STALL: ${stall#*] }"
            break
        fi
        if [ "${DIAG_AFTER:-0}" -gt 0 ] && [ "$waited" -ge "$DIAG_AFTER" ]; then
            diag "the session's timeout is near"; DIAG_AFTER=0
        fi
    done
) &
{ [ -c /dev/kvm ] && [ -d /sys/module/kvm_amd ]; } || die "no /dev/kvm in the test host: kvm_amd did not load ($(dmesg | grep -iE 'kvm|svm' | tail -n 3 | tr '\n' ' '))"
cut -d' ' -f1 /proc/uptime > /ctl/booted
log "running the command"
chroot /host /usr/bin/env -i /bin/bash "$CTL_PATH/inner.sh"
log "command finished ($?)"
sync
poweroff -f
sleep 10
INIT
    chmod 0755 "$root/init"
    pack_cpio "$root" "$l1"
    rm -rf "$root"
    echo "$key" > "$l1.key"
fi
flock -u 8

# ---------------------------------------------------------------------------------------------
# The session: a private directory on this machine; its ctl/ subdirectory is shared with L1.
sess=$(mktemp -d "${TMPDIR:-/tmp}/swiftvmm-testhost.XXXXXX")
ctl=$sess/ctl
mkdir -p "$ctl"
pids=()
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    if [ "$keep" = 1 ]; then say "session directory kept: $sess"; else rm -rf "$sess"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Read-write directories: the repository plus --rw; each its own 9p share.
rw_all=("$REPO_DIR")
for d in "${rw_dirs[@]}"; do
    [ -d "$d" ] || { say "--rw $d: no such directory"; exit 2; }
    d=$(cd "$d" && pwd -P)
    [ "$d" = "$REPO_DIR" ] || rw_all+=("$d")
done
virtfs=(-virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
        -virtfs "local,path=$ctl,mount_tag=ctl,security_model=none,multidevs=remap")
: > "$ctl/rw.list"
n=0
for d in "${rw_all[@]}"; do
    case $d in *$'\n'*|*,*) say "cannot share a directory whose name has a comma or newline: $d"; exit 2 ;; esac
    virtfs+=(-virtfs "local,path=$d,mount_tag=rw$n,security_model=none,multidevs=remap")
    printf 'rw%d %s\n' "$n" "$d" >> "$ctl/rw.list"
    n=$((n + 1))
done
# The test host's kernel symbols, cached per kernel version (see the L1 /init).
ksyms=$l1dir/kallsyms-$kver
[ -s "$ksyms" ] || : > "$ctl/want-kallsyms"
# DIAG_AFTER: seconds after the mounts at which L1 prints its diagnostics (a minute before the timeout).
printf 'CTL_PATH=%q\nKVM_AMD_NPT=%q\nDIAG_AFTER=%q\n' "$ctl" "${TESTHOST_NPT:-1}" $((timeout_s > 150 ? timeout_s - 90 : 0)) > "$ctl/config"

# The command's script, run by bash in the chroot.
pybin=$(dirname "$(python_bin 2>/dev/null || echo /usr/bin/python3)")
{
    echo "# generated by testhost.sh"
    printf 'export PATH=%q\n' "/opt/swift/usr/bin:$pybin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    printf 'export HOME=%q LANG=C.UTF-8 TERM=dumb TESTHOST=1 TESTHOST_CTL=%q\n' "${HOME:-/root}" "$ctl"
    for e in "${env_args[@]}"; do
        name=${e%%=*}
        if [ "$name" = "$e" ]; then
            [ -n "${!name+set}" ] && printf 'export %s=%q\n' "$name" "${!name}"
        else
            printf 'export %s=%q\n' "$name" "${e#*=}"
        fi
    done
    printf 'cd -- %q 2>/dev/null || { echo "testhost: the working directory %s is not visible in the test host (pass it with --rw)" >&2; echo 125 > %q; exit; }\n' \
        "$PWD" "$PWD" "$ctl/status.tmp"
    printf '%q ' "$@"
    printf '> %q 2> %q < /dev/null\n' "$ctl/out" "$ctl/err"
    printf 'echo $? > %q\n' "$ctl/status.tmp"
    printf 'mv %q %q\n' "$ctl/status.tmp" "$ctl/status"
} > "$ctl/inner.sh"
: > "$ctl/out"
: > "$ctl/err"

# ---------------------------------------------------------------------------------------------
start=$(date +%s%N)
"$qemu" -version >/dev/null 2>&1 || { say "$qemu does not run"; exit 125; }
timeout --kill-after=10 "$timeout_s" "$qemu" \
    -nodefaults -no-user-config -display none -no-reboot -monitor none \
    -name testhost,debug-threads=on -qmp "unix:$sess/qmp.sock,server=on,wait=off" \
    -accel "tcg,thread=$tcg_thread" -cpu "${TESTHOST_CPU:-EPYC}" -smp "$cpus" -m "$mem" \
    -kernel "/boot/vmlinuz-$kver" -initrd "$l1" \
    -append "console=ttyS0 quiet loglevel=3 nokaslr panic=-1 mitigations=off transparent_hugepage=never" \
    -serial "file:$sess/console.log" \
    "${virtfs[@]}" \
    < /dev/null > "$sess/qemu.out" 2> "$sess/qemu.err" &
qpid=$!
pids+=("$qpid")
# The test host's kernel sometimes locks up under QEMU's emulation: its watchdog prints "BUG: soft
# lockup" on the console, or its /init's watchdog reports a hung task or an RCU stall, or it hangs
# outright (the heartbeat stops), and nothing else happens until the timeout. End the session at once.
(
    while kill -0 "$qpid" 2>/dev/null; do
        sleep 5
        why=
        if grep -q 'BUG: soft lockup' "$sess/console.log" 2>/dev/null; then
            why="soft lockup"
        elif grep -q 'testhost-l1: KERNEL STALL' "$sess/console.log" 2>/dev/null; then
            why="$(grep -m 1 'testhost-l1: KERNEL STALL' "$sess/console.log" | sed 's/.*KERNEL STALL: //' | tr -d '\r' | cut -c1-100)"
        elif [ -f "$ctl/booted" ] && [ ! -f "$ctl/status" ] &&
             [ $(( $(date +%s) - $(stat -c %Y "$sess/console.log") )) -gt "$silence" ]; then
            why="its console silent for $silence s, no heartbeat"
        fi
        if [ -n "$why" ]; then
            echo "$why" > "$sess/lockup"
            # Where its vCPUs are, before it is ended (QEMU's threads and registers; at most ~10 s).
            timeout 30 "$(python_bin)" "$GT_DIR/tools/l1-state.py" "$sess/qmp.sock" "$qpid" "$ksyms" \
                > "$sess/l1-state" 2>&1 || true
            kill "$qpid" 2>/dev/null
            break
        fi
    done
) &
pids+=($!)
if [ "$stream" = 1 ]; then
    tail -c +1 -f --pid="$qpid" "$ctl/out" &
    pids+=($!); tail_out=$!
    tail -c +1 -f --pid="$qpid" "$ctl/err" >&2 &
    pids+=($!); tail_err=$!
fi
set +e
wait "$qpid"
qemu_status=$?
set -e
if [ -s "$ctl/kallsyms" ] && [ ! -s "$ksyms" ]; then
    cp "$ctl/kallsyms" "$ksyms.tmp.$$" && mv "$ksyms.tmp.$$" "$ksyms" || rm -f "$ksyms.tmp.$$"
fi
if [ "$stream" = 1 ]; then
    wait "$tail_out" "$tail_err" 2>/dev/null || true
else
    cat "$ctl/out"
    cat "$ctl/err" >&2
fi
elapsed=$(( ($(date +%s%N) - start) / 1000000 ))
secs=$(printf '%d.%01d' $((elapsed / 1000)) $((elapsed % 1000 / 100)))

show_console() {
    grep -v "TCG doesn't support requested feature" "$sess/qemu.err" >&2 || true
    if [ "$keep" = 1 ]; then say "last lines of the test host console ($sess/console.log):"
    else say "last lines of the test host console (--keep keeps it):"; fi
    sed '/==== diagnostics/,/==== end of diagnostics/d; /testhost-l1: heartbeat /d' "$sess/console.log" | tail -n 40 >&2 || true
}
# The test host's own diagnostics (its /init's diag), at most 400 lines of them.
show_diagnostics() {
    grep -q '==== diagnostics' "$sess/console.log" 2>/dev/null || return 0
    say "the test host's diagnostics (its processes, blocked tasks, kernel log):"
    sed -n '/==== diagnostics/,/==== end of diagnostics/p' "$sess/console.log" | head -n 400 >&2
}
if [ -f "$ctl/status" ]; then
    status=$(cat "$ctl/status")
    say "command exited $status; session ${secs}s (test host booted in $(cat "$ctl/booted" 2>/dev/null || echo '?')s of its own uptime)"
    exit "$status"
fi
if [ -f "$sess/lockup" ]; then
    say "TEST HOST FAILED: its kernel locked up ($(cat "$sess/lockup")) after ${secs}s; session ended"
    show_diagnostics
    if [ -s "$sess/l1-state" ]; then
        say "its vCPUs before it was ended (guest-tests/tools/l1-state.py):"
        sed 's/^/testhost: /' "$sess/l1-state" >&2
    fi
    show_console
    exit 125
fi
# A panic of the test host's kernel (seen once in CI: "corrupted stack end detected inside scheduler"
# as a VMM's vCPU thread exited under kvm_amd on QEMU's emulated SVM) reboots it, and -no-reboot
# ends QEMU: the command never reports a status. Named as such, so that callers can run it again.
panic=$(grep -a -m 1 'Kernel panic - not syncing: ' "$sess/console.log" 2>/dev/null | sed 's/.*not syncing: //' | tr -d '\r' | cut -c1-100 || true)
if [ -n "$panic" ] && [ ! -f "$ctl/host-error" ]; then
    say "TEST HOST FAILED: its kernel panicked ($panic) after ${secs}s; session ended"
    show_console
    exit 125
fi
if [ "$qemu_status" = 124 ] || [ "$qemu_status" = 137 ]; then
    if [ -f "$ctl/booted" ]; then
        say "TIMEOUT: the command did not finish within ${timeout_s}s (test host session killed)"
        show_diagnostics
        show_console
        exit 124
    fi
    say "TEST HOST FAILED: it did not boot within ${timeout_s}s"
    show_console
    exit 125
fi
if [ -f "$ctl/host-error" ]; then
    say "TEST HOST FAILED: $(cat "$ctl/host-error")"
elif [ -f "$ctl/booted" ]; then
    say "TEST HOST FAILED: the command was started but reported no exit status (qemu exit status $qemu_status)"
else
    say "TEST HOST FAILED: it did not start the command (qemu exit status $qemu_status)"
fi
show_console
exit 125

"""Boot the stock Debian kernel with the busybox test initramfs and check what the guest saw."""

from guestrun import BASE_CMDLINE, GuestRun, bzimage_version

BOOT = GuestRun(
    name="boot",
    case_script="\n".join([
        'echo "uname=$(uname -r)"',
        'echo "cmdline=$(cat /proc/cmdline)"',
        "echo \"memtotal=$(sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo)\"",
        'echo "cpus=$(grep -c ^processor /proc/cpuinfo)"',
    ]),
    swiftvmm_args=("--memory", "256M", "--cpus", "1"),
    cmdline_extra="swiftvmm.e2e=boot",
    timeout=300,
)

GUEST_RUNS = [BOOT]


def test_boot_reaches_init_runs_case_and_powers_off(guest):
    r = guest("boot")
    r.assert_in_order("swiftvmm-guest: init reached", "swiftvmm-guest: case exit=0", "swiftvmm-guest: powering off")


def test_boot_vmm_exits_0(guest):
    guest("boot").assert_exit(0)


def test_boot_runs_the_stock_kernel(guest, guest_kernel_version, guest_vmlinuz):
    r = guest("boot")
    header_version = bzimage_version(guest_vmlinuz).split()[0]
    r.check(header_version == guest_kernel_version,
            f"vmlinuz header says {header_version!r}, build-guest.sh recorded {guest_kernel_version!r}")
    uname = r.value("uname=")
    r.check(uname == guest_kernel_version, f"guest uname -r is {uname!r}, expected {guest_kernel_version!r}")


def test_boot_passes_the_command_line(guest):
    r = guest("boot")
    cmdline = r.value("cmdline=")
    r.check(cmdline is not None and BOOT.cmdline in cmdline,
            f"/proc/cmdline is {cmdline!r}; it should contain {BOOT.cmdline!r}")
    r.check(BASE_CMDLINE in (cmdline or ""), "base command line missing")


def test_boot_memory_and_cpus(guest):
    r = guest("boot")
    mem = r.value("memtotal=")
    r.check(mem is not None and mem.isdigit() and 200_000 < int(mem) <= 262_144,
            f"MemTotal {mem!r} kB is not about 256 MiB")
    r.check(r.value("cpus=") == "1", f"guest sees {r.value('cpus=')!r} CPUs, expected 1")


def test_boot_no_kernel_panic_or_oops(guest):
    r = guest("boot")
    r.assert_printed_good_lines()
    bad = [line for line in r.lines if any(s in line for s in ("Kernel panic", "Oops", "BUG:", "Call Trace"))]
    r.check(not bad, f"kernel trouble in the console: {bad[:5]}")

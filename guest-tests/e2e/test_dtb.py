"""--dtb: the machine's device tree reaches the guest kernel as boot_params setup_data (SETUP_DTB).

Debian's amd64 kernel is built without CONFIG_OF, so it does not use the tree (there is no
/sys/firmware/fdt); it still keeps every setup_data entry and shows it in
/sys/kernel/boot_params/setup_data/N/{type,data}. The guest reads the entry there, and the test
compares it with what `swiftvmm run --dump-dtb` writes on the host for the same kernel, initrd,
command line and options: the same bytes. A kernel with CONFIG_OF would also show the tree as
/sys/firmware/fdt; if this one does, it must be the same bytes too."""

import hashlib
import subprocess

from guestrun import GuestRun

ARGS = ("--memory", "256M", "--cpus", "2", "--dtb")

DTB = GuestRun(
    name="dtb",
    case_script="\n".join([
        "d=/sys/kernel/boot_params/setup_data",
        'echo "entries=$(ls $d 2>/dev/null | tr "\\n" " ")"',
        'echo "type=$(cat $d/0/type 2>/dev/null)"',
        'echo "size=$(wc -c < $d/0/data 2>/dev/null)"',
        'echo "md5=$(md5sum < $d/0/data 2>/dev/null | cut -d" " -f1)"',
        'echo "fdt=$( [ -e /sys/firmware/fdt ] && md5sum < /sys/firmware/fdt | cut -d" " -f1 || echo none)"',
    ]),
    swiftvmm_args=ARGS,
    cmdline_extra="swiftvmm.e2e=dtb",
    timeout=300,
)

GUEST_RUNS = [DTB]


def host_dump(guest_session, tmp_path) -> bytes:
    """The tree `--dump-dtb` writes for this case's kernel, initrd, command line and options."""
    out = tmp_path / "dtb.dtb"
    args = [a for a in ARGS if a != "--dtb"]
    proc = subprocess.run([guest_session.vmm, "run", "--dump-dtb", str(out), "--kernel", str(guest_session.vmlinuz),
                           "--initrd", str(guest_session.initrd(DTB.name)), "--cmdline", DTB.cmdline, *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"--dump-dtb failed: {proc.stderr}"
    return out.read_bytes()


def test_dtb_run_is_clean(guest):
    guest("dtb").assert_clean_run()


def test_dtb_setup_data_is_the_dumped_tree(guest, guest_session, tmp_path):
    r = guest("dtb")
    r.assert_printed_good_lines()
    r.check((r.value("entries=") or "").split() == ["0"], f"setup_data entries: {r.value('entries=')!r}, expected one")
    r.check(r.value("type=") == "0x2", f"setup_data type {r.value('type=')!r}, expected 0x2 (SETUP_DTB)")
    dumped = host_dump(guest_session, tmp_path)
    r.check(dumped[:4] == b"\xd0\x0d\xfe\xed", "the host dump is not a DTB")
    r.check(r.value("size=") == str(len(dumped)), f"the guest's entry has {r.value('size=')!r} bytes, the dump {len(dumped)}")
    r.check(r.value("md5=") == hashlib.md5(dumped).hexdigest(), "the guest's entry differs from `--dump-dtb`'s tree")


def test_dtb_fdt_if_the_kernel_has_of(guest, guest_session, tmp_path):
    r = guest("dtb")
    fdt = r.value("fdt=")
    r.check(fdt is not None, "the case did not report /sys/firmware/fdt")
    if fdt != "none":  # a kernel with CONFIG_OF unflattened it: the same bytes
        r.check(fdt == hashlib.md5(host_dump(guest_session, tmp_path)).hexdigest(), "/sys/firmware/fdt differs from the dump")

"""The TPM 2.0 (TIS at 0xFED40000, ACPI MSFT0101 + TPM2 table) end to end, for both swiftvmm backends:
`--tpm builtin,state=FILE` (libtpms in the VMM) and `--tpm swtpm,socket=SOCK` (a running swtpm).

Each case is one tpm_driver.py scenario: the VMM boots the guest twice on the same TPM state (the same
state file; the same swtpm state directory with a new swtpm process), and the guest's case script,
which knows the boot from `e2e.tpmboot=N` on its command line, talks to the TPM with raw TPM 2.0
commands through /dev/tpmrm0 (guest-tests/tools/tpm2cmd.c, put in the initrd as /bin/tpm2cmd):
  boot 1: the kernel bound tpm_tis to a 2.0 TPM; /dev/tpm0 and /dev/tpmrm0 exist; GetCapability;
          GetRandom; NV_Read of the index before it exists (TPM_RC_HANDLE+H2: the state is fresh);
          NV_DefineSpace; NV_Read before any write (TPM_RC_NV_UNINITIALIZED); NV_Write of 32 bytes
          from GetRandom; NV_Read of them; CreatePrimary (RSA 2048 storage key) + FlushContext.
  boot 2: GetCapability; GetRandom; NV_Read gives boot 1's bytes; CreatePrimary gives the same key
          (the owner seed persisted); NV_UndefineSpace; NV_Read fails with TPM_RC_HANDLE+H2 again.
Both boots end with the guest powering off and the VMM exiting 0.

tpm_driver.py also runs the swtpm scenario under QEMU -M q35 with tpm-tis (E2E_VMM=qemu), which
Benchmarks/tpm-bench.sh uses for its like-with-like figures.
"""

from __future__ import annotations

import re

import pytest

from guestrun import GuestRun

INDEX = "0x01500001"
NV_SIZE = 32
RC_HANDLE_H2 = "0x28b"      # TPM_RC_HANDLE for the second handle (the NV index): no such index
RC_NV_UNINITIALIZED = "0x14a"
TIS_LINE = "tpm_tis MSFT0101:00: 2.0 TPM (device-id 0x1, rev-id 1)"  # QEMU's IDs, which swiftvmm reuses

CASE = "\n".join([
    "boot=$(sed -n 's/.*e2e\\.tpmboot=\\([0-9]*\\).*/\\1/p' /proc/cmdline)",
    'echo "case: tpmboot=$boot"',
    # The kernel's lines about the TPM driver's binding (tpm_tis is built in: it probed before /init).
    'echo "case: tis=$(dmesg | grep -m1 "tpm_tis.*TPM")"',
    "dmesg | grep -iE 'tpm' | grep -iE 'error|fail|bug|timed? ?out|not working' | head -n 5 | sed 's/^/case: tpm-bad: /'",
    'echo "case: devs=$(for d in /dev/tpm0 /dev/tpmrm0; do [ -c $d ] && printf "%s," $d; done)"',
    # t LABEL ARGS...: one line `tpm: LABEL exit=N <tpm2cmd's line>` per command.
    't() { label=$1; shift; out=$(tpm2cmd "$@" 2>&1); st=$?; echo "tpm: $label exit=$st $out"; }',
    f"IDX={INDEX}",
    'if [ "$boot" = 1 ]; then',
    "  t getcap getcap",
    "  t getrandom getrandom 32",
    f"  t nvread-undefined nvread $IDX {NV_SIZE}",
    f"  t nvdefine nvdefine $IDX {NV_SIZE}",
    f"  t nvread-unwritten nvread $IDX {NV_SIZE}",
    f"  data=$(tpm2cmd getrandom {NV_SIZE} | sed -n 's/.* hex=\\([0-9a-f]*\\).*/\\1/p')",
    "  t nvwrite nvwrite $IDX ${data:-00}",
    f"  t nvread-written nvread $IDX {NV_SIZE}",
    "  t createprimary createprimary",
    "else",
    "  t getcap getcap",
    "  t getrandom getrandom 32",
    f"  t nvread-persisted nvread $IDX {NV_SIZE}",
    "  t createprimary createprimary",
    "  t nvundefine nvundefine $IDX",
    f"  t nvread-undefined nvread $IDX {NV_SIZE}",
    "fi",
    'echo "case: tpm steps done"',
])


def tpm_run(backend: str) -> GuestRun:
    return GuestRun(
        name=f"tpm-{backend}",
        case_script=CASE,
        swiftvmm_args=("--memory", "256M"),
        cmdline_extra=f"swiftvmm.e2e=tpm-{backend}",
        tools=("tpm2cmd",),
        driver="tpm_driver.py",
        driver_args=("--backend", backend, "--"),
        timeout=600,
    )


BACKENDS = ("builtin", "swtpm")
GUEST_RUNS = [tpm_run(b) for b in BACKENDS]


class TpmCase:
    """One backend's scenario: the driver's summary and each boot's `tpm:` lines, parsed."""

    def __init__(self, guest, backend: str):
        self.backend = backend
        self.r = guest(f"tpm-{backend}")
        self.s = self.r.artifact_json("summary.json") if self.r.artifact("summary.json").exists() else {}

    def boot(self, n: int):
        p = self.r.part(f"boot{n}")
        if not p.ran:
            self.r.fail(f"the driver left no console of boot {n} (it stopped at step {self.s.get('step')!r}: "
                        f"{self.s.get('error')!r})")
        return p

    def steps(self, n: int) -> dict[str, dict]:
        """label -> {"exit": int, "cmd": tpm2cmd's command word, k: v...} of boot n's `tpm: ` lines."""
        out = {}
        for line in self.boot(n).lines:
            m = re.match(r"^tpm: (\S+) exit=(\d+) (\S+)(.*)$", line)
            if m:
                kv = dict(item.split("=", 1) for item in m.group(4).split() if "=" in item)
                out[m.group(1)] = {"exit": int(m.group(2)), "cmd": m.group(3), **kv}
        return out

    def step(self, n: int, label: str) -> dict:
        st = self.steps(n)
        if label not in st:
            self.boot(n).fail(f"boot {n} printed no 'tpm: {label}' line (steps seen: {sorted(st)})")
        return st[label]

    def expect_rc(self, n: int, label: str, rc: str) -> dict:
        st = self.step(n, label)
        p = self.boot(n)
        p.check(st.get("rc") == rc, f"boot {n} {label}: response code {st.get('rc')!r} "
                                    f"({st.get('err', 'no error name')}), expected {rc}: {st}")
        p.check(st["exit"] == (0 if rc == "0x000" else 1), f"boot {n} {label}: tpm2cmd exited {st['exit']}")
        return st


@pytest.fixture(params=BACKENDS)
def tpm(request, guest) -> TpmCase:
    return TpmCase(guest, request.param)


def test_tpm_both_boots_ran_and_powered_off(tpm):
    if tpm.r.index_of("driver: scenario complete") < 0:
        why = ""
        for n in (1, 2):
            p = tpm.r.part(f"boot{n}")
            if p.ran and p.status != 0:
                why = f"\n--- last lines of boot {n}'s standard error:\n" + "\n".join(p.err_lines[-10:])
        tpm.r.fail(f"the driver stopped at step {tpm.s.get('step')!r}: {tpm.s.get('error')!r}{why}")
    for n in (1, 2):
        p = tpm.boot(n)
        p.assert_clean_run()  # /init, the case script exited 0, power-off began, the VMM exited 0
        p.check(p.value("case: tpmboot=") == str(n), f"the guest saw e2e.tpmboot={p.value('case: tpmboot=')!r}")
        p.check(p.index_of("case: tpm steps done") >= 0, "the case script did not finish its TPM steps")
    tpm.r.assert_exit(0)


def test_tpm_vmm_command_lines(tpm):
    """swiftvmm: exactly `swiftvmm run --kernel K --initrd I --cmdline C --memory 256M --tpm ...` with
    the state under /run (the test host's tmpfs); QEMU: q35 + tpm-tis + the swtpm socket."""
    boots = tpm.s.get("boots", [])
    tpm.r.check(len(boots) >= 1, f"the driver recorded no boot (step {tpm.s.get('step')!r}: {tpm.s.get('error')!r})")
    tpm_args = []
    for n, b in enumerate(boots, 1):
        argv = b.get("argv", [])
        if tpm.s.get("vmm") == "qemu":
            tpm_args.append(argv[-6:])
            tpm.r.check(argv[-6:] == ["-chardev", f"socket,id=chrtpm,path={tpm.s.get('private_dir')}/swtpm.sock",
                                      "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0"]
                        and argv[argv.index("-M") + 1] == "q35", f"boot {n}: QEMU command line {argv}")
            continue
        tpm_args.append(argv[10:])
        tpm.r.check(argv[1:3] == ["run", "--kernel"] and argv[4] == "--initrd" and argv[6] == "--cmdline"
                    and argv[8:10] == ["--memory", "256M"] and argv[10] == "--tpm"
                    and argv[12:] == ["--log-level", "info"] and len(argv) == 14,
                    f"boot {n}: swiftvmm command line {argv}")
        tpm.r.check(argv[7].endswith(f"swiftvmm.e2e=tpm-{tpm.backend} e2e.tpmboot={n}"),
                    f"boot {n}: --cmdline {argv[7]!r}")
        where = tpm.s.get("private_dir", "?")
        want = f"builtin,state={where}/tpm-state" if tpm.backend == "builtin" else f"swtpm,socket={where}/swtpm.sock"
        tpm.r.check(argv[11] == want, f"boot {n}: --tpm {argv[11]!r}, expected {want!r}")
    # The driver falls back to $TMPDIR only where /run is not writable (never in the test host).
    tpm.r.check(tpm.s.get("private_dir", "").startswith("/run/swiftvmm-tpm-"),
                f"the TPM state and socket are not under /run: {tpm.s.get('private_dir')!r}")
    tpm.r.check(len(set(map(tuple, tpm_args))) == 1, f"the boots used different TPM arguments: {tpm_args}")


def test_tpm_state_persists_between_the_processes(tpm):
    boots = tpm.s.get("boots", [])
    tpm.r.check(len(boots) == 2, f"the driver recorded {len(boots)} boots")
    after1 = boots[0].get("state_after", {})
    if tpm.backend == "builtin":
        tpm.r.check(boots[0].get("state_before") == {}, f"the state file existed before boot 1: {boots[0]}")
        tpm.r.check(len(after1) == 1 and next(iter(after1.values())) > 0,
                    f"no (or an empty) state file after boot 1: {after1}")
    else:
        tpm.r.check(after1.get("tpm2-00.permall", 0) > 0, f"swtpm's state directory after boot 1: {after1}")
        pids = [b.get("swtpm_pid") for b in boots]
        tpm.r.check(None not in pids and pids[0] != pids[1], f"boot 2 did not get a new swtpm process: {pids}")
        for b in boots:
            sw = b.get("swtpm", {})
            tpm.r.check(sw.get("status") in (0, -15), f"{b['name']}: swtpm ended with {sw}")


def test_tpm_tis_bound_and_device_nodes(tpm):
    for n in (1, 2):
        p = tpm.boot(n)
        p.assert_printed_good_lines()
        tis = p.value("case: tis=") or ""
        p.check(tis.endswith(TIS_LINE) or TIS_LINE in tis,
                f"boot {n}: the kernel did not bind tpm_tis to a 2.0 TPM; its line: {tis!r} (expected {TIS_LINE!r})")
        p.check(p.value("case: devs=") == "/dev/tpm0,/dev/tpmrm0,",
                f"boot {n}: TPM device nodes {p.value('case: devs=')!r}, expected /dev/tpm0 and /dev/tpmrm0")
        bad = [line for line in p.lines if line.startswith("case: tpm-bad: ")]
        p.check(not bad, f"boot {n}: TPM trouble in dmesg: {bad}")


def test_tpm_getcap(tpm):
    for n in (1, 2):
        st = tpm.expect_rc(n, "getcap", "0x000")
        p = tpm.boot(n)
        p.check(st.get("family") == "2.0", f"boot {n}: TPM_PT_FAMILY_INDICATOR {st.get('family')!r}")
        # Both backends are libtpms, whose manufacturer is IBM.
        p.check(st.get("manufacturer") == "IBM", f"boot {n}: TPM_PT_MANUFACTURER {st.get('manufacturer')!r}")


def test_tpm_getrandom(tpm):
    seen = []
    for n in (1, 2):
        st = tpm.expect_rc(n, "getrandom", "0x000")
        hx = st.get("hex", "")
        tpm.boot(n).check(st.get("bytes") == "32" and re.fullmatch(r"[0-9a-f]{64}", hx) is not None,
                          f"boot {n}: asked for 32 random bytes, got {st}")
        tpm.boot(n).check(hx != "0" * 64, f"boot {n}: GetRandom returned zeros")
        seen.append(hx)
    tpm.r.check(seen[0] != seen[1], f"both boots got the same random bytes {seen[0]}")


def test_tpm_nv_index_on_the_first_boot(tpm):
    tpm.expect_rc(1, "nvread-undefined", RC_HANDLE_H2)   # a fresh TPM: no such index yet
    tpm.expect_rc(1, "nvdefine", "0x000")
    tpm.expect_rc(1, "nvread-unwritten", RC_NV_UNINITIALIZED)
    w = tpm.expect_rc(1, "nvwrite", "0x000")
    tpm.boot(1).check(w.get("bytes") == str(NV_SIZE), f"nvwrite wrote {w.get('bytes')} bytes")
    r = tpm.expect_rc(1, "nvread-written", "0x000")
    tpm.boot(1).check(re.fullmatch(r"[0-9a-f]{64}", r.get("hex", "")) is not None and r["hex"] != "0" * 64,
                      f"NV_Read after NV_Write: {r}")


def test_tpm_nv_value_survives_the_vmm_restart(tpm):
    written = tpm.expect_rc(1, "nvread-written", "0x000")["hex"]
    again = tpm.expect_rc(2, "nvread-persisted", "0x000")
    tpm.boot(2).check(again.get("hex") == written,
                      f"boot 2 read {again.get('hex')!r} from NV index {INDEX}; boot 1 wrote {written!r}")
    tpm.expect_rc(2, "nvundefine", "0x000")
    tpm.expect_rc(2, "nvread-undefined", RC_HANDLE_H2)


def test_tpm_createprimary_same_key_after_restart(tpm):
    keys = []
    for n in (1, 2):
        st = tpm.expect_rc(n, "createprimary", "0x000")
        tpm.boot(n).check(st.get("flush_rc") == "0x000" and st.get("keybits") == "2048"
                          and st.get("modulus_bytes") == "256", f"boot {n}: createprimary {st}")
        keys.append(st.get("modulus_head"))
    tpm.r.check(keys[0] == keys[1], f"the owner's primary key differs between the boots ({keys}): "
                                    f"the owner seed did not persist")

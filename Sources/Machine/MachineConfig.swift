import Devices
import BootLoader
import KVM
import Snapshot
import VMMCore
import VMMSys
import Virtio

/// What to boot.
public enum BootSource: Sendable {
    /// Direct boot of a Linux bzImage through the 64-bit boot protocol.
    case linux(kernel: BzImage, initrd: [UInt8]?, commandLine: String)
    /// Firmware (`rom`, mapped read-only just below 4 GiB, entered at the reset vector) that loads the
    /// kernel, initrd and command line from fw_cfg, runs the ACPI table-loader and boots Linux.
    case firmware(rom: [UInt8], kernel: BzImage, initrd: [UInt8]?, commandLine: String)
    /// A flat 64-bit program loaded at `loadAddress` and entered there in long mode, with RSI = 0.
    /// Used by tests and diagnostics: it gets the same CPU state a Linux kernel gets.
    case program64(code: [UInt8], loadAddress: UInt64)
}

public struct MachineConfig: Sendable {
    public var memorySize: UInt64
    public var cpus: Int
    public var console: any ConsoleOutput
    public var kvmPath: String
    /// Route SIGINT/SIGTERM/SIGHUP to an orderly stop (the CLI does; tests do not).
    public var handleSignals: Bool
    /// Give the guest ACPI tables (default). Without them Linux finds no RSDP, so no SCI, no S5
    /// (power-off falls back to a reset) and no second vCPU: one vCPU only.
    public var acpi: Bool
    /// The CPU the guest is given (CPUID and the MSRs its snapshots carry).
    public var cpuModel: CPUModel = .host
    /// The initial VM generation ID (guest byte order; see `VMGenID.parseGUID`). The vmgenid device
    /// exists whenever ACPI does.
    public var vmGenerationID: [UInt8] = VMGenID.randomGUID()
    /// The TPM's backend (`--tpm`); nil for a machine without a TPM. Needs ACPI (the guest finds the
    /// TPM through the DSDT and the TPM2 table).
    public var tpm: (any TPMBackend)?
    /// How long a snapshot waits for a TPM command in flight to be answered (an RSA key generation
    /// in an emulated host takes seconds) before it gives up without writing anything.
    public var tpmDrainTimeoutMilliseconds = 60_000
    /// The virtio-mmio devices, in order (device n: window and GSI n of `Layout`). They need ACPI
    /// (the guest finds them in the DSDT).
    public var virtio: [VirtioDeviceSpec] = []
    /// How long a snapshot waits for a virtio request in flight (host I/O) to complete.
    public var virtioDrainTimeoutMilliseconds = 30_000
    /// Hand a direct-boot Linux guest the machine's flattened device tree (`PlatformDeviceTree`) as a
    /// SETUP_DTB entry of boot_params' setup_data (`--dtb`), for kernels built with CONFIG_OF.
    public var deviceTree = false
    /// Extra read-only fw_cfg files (name, content), e.g. from `--fw-cfg name=opt/...,file=PATH`.
    public var fwCfgFiles: [(name: String, data: [UInt8])] = []
    /// When the process started (CLOCK_MONOTONIC, ns); `run()` then logs (info) how long after it the
    /// vCPUs first enter the guest.
    public var processStart: UInt64?

    public static let minimumMemory: UInt64 = 2 << 20
    /// The most guest memory a machine gets, whatever the host has (1 TiB).
    public static let maximumMemory: UInt64 = 1 << 40

    /// Why `size` cannot be a machine's guest memory, or nil when it can: a multiple of 4 KiB from
    /// `minimumMemory` to `maximumMemory`, and no more than the host's physical RAM (`hostMemory`).
    /// Checked before anything is mapped: KVM's per-page bookkeeping for a huge memory slot alone
    /// costs the host gigabytes, even when the guest never touches the pages.
    public static func memorySizeProblem(_ size: UInt64, hostMemory: UInt64? = hostPhysicalMemory()) -> String? {
        func show(_ bytes: UInt64) -> String {
            bytes >= 1 << 30 && bytes % (1 << 30) == 0 ? "\(bytes >> 30) GiB"
                : bytes >= 1 << 20 && bytes % (1 << 20) == 0 ? "\(bytes >> 20) MiB" : "\(bytes) bytes"
        }
        if size < minimumMemory || size % 4096 != 0 {
            return "guest memory must be a multiple of 4 KiB and at least \(minimumMemory >> 20) MiB (got \(show(size)))"
        }
        if size > maximumMemory {
            return "guest memory of \(show(size)) is more than the maximum of \(show(maximumMemory))"
        }
        if let host = hostMemory, size > host {
            return "guest memory of \(show(size)) is more than this host's \(host >> 20) MiB of RAM"
        }
        return nil
    }
    /// xAPIC IDs are 8 bits and 0xFF is the broadcast ID.
    public static let maximumCPUs = 254

    public init(memorySize: UInt64 = 256 << 20, cpus: Int = 1, console: any ConsoleOutput,
                kvmPath: String = "/dev/kvm", handleSignals: Bool = false, acpi: Bool = true) {
        self.memorySize = memorySize
        self.cpus = cpus
        self.console = console
        self.kvmPath = kvmPath
        self.handleSignals = handleSignals
        self.acpi = acpi
    }
}

/// Why a machine could not be built or run.
public enum MachineError: Error, CustomStringConvertible, Sendable {
    case kvm(KVMError)
    case boot(BootError)
    case memory(GuestMemoryError)
    case system(SysError)
    case bus(BusError)
    case acpi(PlatformTables.LoadError)
    case fwCfg(FwCfgError)
    case snapshot(SnapshotError)
    case invalidConfig(String)
    /// The memory file a restored machine runs from changed under it (`Machine.memoryFileProblem`).
    case memoryFileChanged(String)
    /// The TPM's command in flight did not finish in time for a snapshot.
    case tpmBusy(timeoutMilliseconds: Int)
    /// The TPM's own state could not be saved or brought back.
    case tpmState(String)

    public var description: String {
        switch self {
        case .kvm(let e): return e.description
        case .boot(let e): return e.description
        case .memory(let e): return e.description
        case .system(let e): return e.description
        case .bus(let e): return e.description
        case .acpi(let e): return e.description
        case .fwCfg(let e): return "fw_cfg: \(e)"
        case .snapshot(let e): return e.description
        case .invalidConfig(let s): return s
        case .memoryFileChanged(let s): return s
        case .tpmState(let s): return "the TPM: \(s)"
        case .tpmBusy(let t):
            return "the TPM's command in flight did not finish within \(t / 1000).\(t % 1000 / 100) s, so no snapshot was written (a snapshot holds the TPM only between commands); try again"
        }
    }
}

/// Why a machine's run ended, as QEMU's SHUTDOWN event names it (QAPI `ShutdownCause`).
public enum ShutdownCause: Equatable, Sendable {
    /// The guest powered off (ACPI S5, a KVM shutdown event), or every vCPU halted for good.
    case guestShutdown
    /// The guest asked for a reset (i8042, reset register, a KVM reset event).
    case guestReset
    /// The guest crashed: it reported a crash (KVM_SYSTEM_EVENT_CRASH) or a vCPU triple-faulted.
    case guestPanic
    /// The control socket asked the VMM to quit (also a host program's own request to stop).
    case hostQMPQuit
    /// The control socket's `system_reset` (which, like a guest reset, ends the VM).
    case hostQMPSystemReset
    /// This signal asked the VMM to stop.
    case hostSignal(Int32)
    /// The VMM or KVM failed.
    case hostError

    /// QEMU's name for the cause: the SHUTDOWN and RESET events' `reason`.
    public var reason: String {
        switch self {
        case .guestShutdown: "guest-shutdown"
        case .guestReset: "guest-reset"
        case .guestPanic: "guest-panic"
        case .hostQMPQuit: "host-qmp-quit"
        case .hostQMPSystemReset: "host-qmp-system-reset"
        case .hostSignal: "host-signal"
        case .hostError: "host-error"
        }
    }

    /// Whether the guest caused it (the events' `guest` member).
    public var isGuest: Bool {
        switch self {
        case .guestShutdown, .guestReset, .guestPanic: true
        case .hostQMPQuit, .hostQMPSystemReset, .hostSignal, .hostError: false
        }
    }
}

/// How a machine's run ended: the cause, and what happened in words (`detail`; for a crash or a
/// failure with a register dump where there is one).
public struct MachineExit: Equatable, Sendable {
    public var cause: ShutdownCause
    public var detail: String

    public init(_ cause: ShutdownCause, _ detail: String) {
        self.cause = cause
        self.detail = detail
    }

    /// The guest powered off (ACPI S5, or a KVM system event).
    public static func poweredOff(_ how: String) -> MachineExit { MachineExit(.guestShutdown, how) }
    /// The guest asked for a reset (i8042, reset register). Like QEMU's -no-reboot, a reset ends the VM.
    public static func reset(_ how: String) -> MachineExit { MachineExit(.guestReset, how) }
    /// The control socket reset the VM (`system_reset`), which ends it as a guest reset does.
    public static func hostReset(_ how: String) -> MachineExit { MachineExit(.hostQMPSystemReset, how) }
    /// The guest crashed: it reported a crash (KVM_SYSTEM_EVENT_CRASH) or a vCPU triple-faulted
    /// (KVM_EXIT_SHUTDOWN; `how` then carries that vCPU's registers).
    public static func guestCrashed(_ how: String) -> MachineExit { MachineExit(.guestPanic, how) }
    /// The VMM or KVM failed; `what` has the details (with a register dump where there is one).
    public static func failed(_ what: String) -> MachineExit { MachineExit(.hostError, what) }
    /// A signal asked the VMM to stop.
    public static func signalled(_ signal: Int32) -> MachineExit { MachineExit(.hostSignal(signal), "signal \(signal)") }
    /// The control socket asked the VMM to quit.
    public static func quit(_ how: String) -> MachineExit { MachineExit(.hostQMPQuit, how) }

    /// Process exit status for the CLI: 0 for power-off, reset and quit.
    public var exitStatus: Int32 {
        switch cause {
        case .guestShutdown, .guestReset, .hostQMPSystemReset, .hostQMPQuit: return 0
        case .guestPanic: return 3
        case .hostError: return 1
        case .hostSignal(let s): return 128 + s
        }
    }

    public var summary: String {
        switch cause {
        case .guestShutdown: return "guest powered off (\(detail))"
        case .guestReset, .hostQMPSystemReset: return "guest reset (\(detail)); the VM ends on reset"
        case .guestPanic: return "guest crashed (\(detail))"
        case .hostError: return "VM failed: \(detail)"
        case .hostSignal(let s): return "stopped by signal \(s)"
        case .hostQMPQuit: return "stopped (\(detail))"
        }
    }
}


/// The CPU a machine's guest sees.
public enum CPUModel: String, Sendable, CaseIterable {
    /// Everything this host's KVM offers: fastest, but a snapshot restores only on hosts that offer
    /// at least the same features.
    case host
    /// x86-64-v2 (SSE4.2, POPCNT, CX16; XSAVE with x87 and SSE state only; no AVX, no PKU) and the
    /// KVM paravirtual features, with only architectural and KVM MSRs in snapshots: what every x86-64
    /// KVM host offers, so that its snapshots restore anywhere (the committed fixtures use it).
    case baseline
}

import ACPI
import DeviceTree
import Devices
import Glibc
import Logging
import VMMCore
import VMMSys
import Virtio

/// The platform devices of the machine, each declared in its model's file and registered here once,
/// with its place from `Layout`. The port and MMIO buses, the snapshot's device sections, the
/// DSDT's devices and the device tree's are all derived from `all`, in its order.
///
/// Adding a device: its model file conforms it to `PlatformDevice` (regions, snapshot section, AML,
/// what it does after a restore); one line below creates it with its `Layout` placement and one
/// `register` call puts it in the list.
struct Platform {
    /// What the devices are connected to.
    struct Wiring {
        var console: any ConsoleOutput
        /// The interrupt line for a GSI.
        var line: (UInt32) -> any InterruptLine
        var memory: GuestMemory
        /// The VM generation ID the guest starts with; nil for a machine without ACPI (no vmgenid).
        var generationID: [UInt8]?
        /// Where the TPM's commands run; nil for a machine without a TPM.
        var tpm: (any TPMBackend)? = nil
        /// The virtio devices, in their order (device n gets window and GSI n), each with the
        /// worker whose eventfds connect it.
        var virtio: [(spec: VirtioDeviceSpec, worker: VirtioWorker?)] = []
        var onPowerOff: @Sendable (String) -> Void = { _ in }
        var onReset: @Sendable (String) -> Void = { _ in }
        var logger = Logger(label: "swiftvmm.machine")
    }

    let serial: Serial16550
    let i8042: I8042
    let cmos: CMOSClock
    let fwCfg: FwCfg
    let acpi: ACPIPowerManagement
    let vmgenid: VMGenID?
    let tpm: TPMTIS?
    let virtio: [VirtioMMIO]
    private var registry = DeviceRegistry()
    var all: [any PlatformDevice] { registry.devices }
    var pio: Bus { registry.pio }
    var mmio: Bus { registry.mmio }

    init(_ w: Wiring) throws(BusError) {
        let logger = w.logger
        let onReset = w.onReset, onPowerOff = w.onPowerOff
        serial = Serial16550(output: w.console, irq: w.line(Layout.com1IRQ),
                             placement: .init(port: Layout.com1, gsi: Layout.com1IRQ))
        i8042 = I8042(irq: w.line(Layout.i8042IRQ), placement: .init(port: Layout.i8042, gsi: Layout.i8042IRQ)) {
            onReset("keyboard controller reset")
        }
        cmos = CMOSClock(placement: .init(port: Layout.cmos, gsi: Layout.rtcIRQ)) { Int(time(nil)) }
        fwCfg = FwCfg(memory: w.memory, placement: .init(port: Layout.fwCfgPorts, mmio: Layout.fwCfgMMIO))
        acpi = ACPIPowerManagement(
            gpeBlockLength: Layout.gpe0Length, s5SleepType: PlatformTables.s5SleepType,
            sci: w.line(Layout.sciIRQ), now: { monotonicNanoseconds() },
            onPowerOff: { onPowerOff("ACPI S5") },
            onReset: { onReset("ACPI reset register") },
            onUnsupportedSleep: { type in logger.notice("guest asked for sleep type \(type), which this machine does not offer; ignored") },
            placement: .init(pm1aEvent: Layout.pm1aEvent, pm1aControl: Layout.pm1aControl, pmTimer: Layout.pmTimer,
                             gpe0: Layout.gpe0, resetRegister: Layout.resetRegister))
        let acpi = self.acpi
        // GPE 5 carries its notifications; the guest's clear of that status bit acknowledges them.
        vmgenid = w.generationID.map { VMGenID(guid: $0, memory: w.memory, acpi: acpi) }
        tpm = w.tpm.map { TPMTIS(backend: $0, placement: .init(base: Layout.tpmTIS)) }
        precondition(w.virtio.count <= Layout.maxVirtioDevices, "more virtio devices than GSIs")
        virtio = w.virtio.enumerated().map { n, entry in
            let model: any VirtioDeviceModel
            switch entry.spec {
            case .block(let store, let id): model = VirtioBlock(store: store, id: id)
            case .rng: model = VirtioRNG(source: HostEntropy())
            case .console: model = VirtioConsole(output: w.console)
            case .net(let backend, let mac): model = VirtioNet(backend: backend, mac: mac)
            }
            let placement = VirtioMMIO.Placement(base: Layout.virtioMMIO + Layout.virtioStride * UInt64(n),
                                                 gsi: Layout.virtioFirstGSI + UInt32(n), index: n)
            let wiring = entry.worker?.wiring ?? VirtioMMIO.Wiring(interrupt: {}, notify: { _ in })
            let device = VirtioMMIO(model: model, memory: w.memory, placement: placement, wiring: wiring)
            entry.worker?.attach(device)
            (model as? VirtioConsole)?.onInput { [device] in device.kick(queue: 0) }
            return device
        }

        // The order is the DSDT's and the snapshot's.
        try registry.register(serial)
        try registry.register(i8042)
        try registry.register(cmos)
        try registry.register(fwCfg)
        try registry.register(acpi)
        if let vmgenid { try registry.register(vmgenid) }
        if let tpm { try registry.register(tpm) }
        for device in virtio { try registry.register(device) }
        try registry.register(QuietPorts())
    }

    var snapshotSections: [(name: String, device: any SnapshotDevice)] { registry.snapshotSections }
    var dsdtDevices: [AML] { registry.dsdtDevices }
    var deviceTreeNodes: [DeviceTreeNode] { registry.deviceTreeNodes }
    var deviceTables: [SDT] { registry.devices.flatMap(\.acpiTables) }

    /// The devices of a machine that will never run, for their ACPI description (`--dump-acpi`) and
    /// device tree (`--dump-dtb`); `tpm`: with a TPM (whose backend is never asked anything);
    /// `acpi`: false for a machine without ACPI (no VM generation ID device).
    static func description(memory: GuestMemory, tpm: Bool = false, virtio: [String] = [], acpi: Bool = true) throws(BusError) -> Platform {
        struct NoLine: InterruptLine { func setLevel(_ high: Bool) {} }
        struct NoConsole: ConsoleOutput { func write(_ bytes: UnsafeRawBufferPointer) {} }
        final class NoDrive: BlockStore {
            let size: UInt64 = 512, readOnly = true, canDiscard = false
            func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool { false }
            func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) -> Bool { false }
            func flush() -> Bool { false }
            func discard(offset: UInt64, length: UInt64) -> Bool { false }
            func writeZeroes(offset: UInt64, length: UInt64, unmap: Bool) -> Bool { false }
        }
        final class NoTPM: TPMBackend {
            let info = TPMBackendInfo(kind: .builtin, path: "")
            let bufferSize = TPMTIS.maxBufferSize
            func submit(_ command: [UInt8], locality: UInt8, complete: @escaping @Sendable ([UInt8]) -> Void) {
                complete(TPMTIS.errorResponse(TPMTIS.rcFailure))
            }
            func cancel() {}
            func waitUntilIdle(timeoutMilliseconds: Int) -> Bool { true }
        }
        return try Platform(Wiring(console: NoConsole(), line: { _ in NoLine() }, memory: memory,
                                   generationID: acpi ? [UInt8](repeating: 0, count: 16) : nil, tpm: tpm ? NoTPM() : nil,
                                   virtio: virtio.map { ($0 == "blk" ? .block(store: NoDrive(), id: "") : $0 == "con" ? .console : .rng, nil) }))
    }
}

/// Platform devices in registration order, and what derives from them.
struct DeviceRegistry {
    private(set) var devices: [any PlatformDevice] = []
    private(set) var pio = Bus()
    private(set) var mmio = Bus()

    /// Adds `device` with its register windows, which must not overlap another's; a snapshot
    /// section name must not repeat (checked as a programming error).
    mutating func register(_ device: any PlatformDevice) throws(BusError) {
        var pio = self.pio, mmio = self.mmio
        for r in device.busRegions {
            switch r.space {
            case .pio: try pio.insert(r.device, name: r.name, base: r.base, size: r.size)
            case .mmio: try mmio.insert(r.device, name: r.name, base: r.base, size: r.size)
            }
        }
        if let name = device.snapshotSection?.name {
            precondition(!snapshotSections.contains { $0.name == name }, "two devices save section \(name)")
            precondition((1...16).contains(name.utf8.count), "section name \(name) is not 1 to 16 characters")
        }
        self.pio = pio
        self.mmio = mmio
        devices.append(device)
    }

    /// The snapshot's device sections, by name, in registration order.
    var snapshotSections: [(name: String, device: any SnapshotDevice)] { devices.compactMap(\.snapshotSection) }

    /// The devices' entries under `\_SB` of the DSDT, in registration order.
    var dsdtDevices: [AML] { devices.flatMap(\.dsdtAML) }

    /// The devices' device-tree nodes, in registration order.
    var deviceTreeNodes: [DeviceTreeNode] { devices.flatMap(\.deviceTreeNodes) }
}

/// The ports Linux probes where this machine has no device (`Layout.quietPorts`): they read as
/// all-ones and ignore writes, without being logged as unhandled.
final class QuietPorts: PlatformDevice {
    let busRegions: [BusRegion] = Layout.quietPorts.map { .pio($0.name, $0.base, $0.size, QuietPort()) }
}

import BootLoader
import DeviceTree
import VMMCore

/// The machine as a flattened device tree (`--dump-dtb`, and `--dtb`, which hands it to the kernel
/// through boot_params' setup_data): the machine's own nodes (memory, CPUs, interrupt
/// controllers, the boot's command line and initrd) from `Layout` and its configuration, and each
/// registered platform device's nodes (`PlatformDevice.deviceTreeNodes`, the same list the DSDT
/// comes from), in registration order. The same configuration always gives the same bytes.
///
///     / { compatible = "swiftvmm,x86-64"; model; interrupt-parent = <&ioapic>; #address-cells = <2>; #size-cells = <2>;
///         chosen { bootargs; linux,initrd-start; linux,initrd-end; }
///         cpus { cpu@N { device_type = "cpu"; reg = <APIC ID>; } ... }
///         memory@0 { device_type = "memory"; reg = <guest RAM, around the 32-bit MMIO hole>; }
///         reserved-memory { firmware@9fc00 { reg = <RAM e820 does not give the kernel>; no-map; } }
///         interrupt-controller@fee00000 { compatible = "intel,ce4100-lapic"; ... }
///         ioapic: interrupt-controller@fec00000 { compatible = "intel,ce4100-ioapic"; #interrupt-cells = <2>; ... }
///         isa@i0 { compatible = "isa"; ranges = <I/O ports 0-0xffff>; serial@i3f8 {...} rtc@i70 {...} }
///         fw-cfg@fef00000 {...} tpm@fed40000 {...} virtio@feb00000 {...} ... }
///
/// Devices with I/O ports sit under the ISA bus node (the ISA binding's `reg = <1 port size>`),
/// the others under the root. Interrupts are `<pin sense>` of the IOAPIC, every node's
/// interrupt parent (inherited from the root).
public enum PlatformDeviceTree {
    /// What the tree says of the boot.
    public struct Boot: Equatable, Sendable {
        public var commandLine: String
        /// Where the initrd lies in guest memory (`linux,initrd-start`, `linux,initrd-end`), if there is one.
        public var initrd: Range<UInt64>?
        public init(commandLine: String, initrd: Range<UInt64>? = nil) {
            self.commandLine = commandLine
            self.initrd = initrd
        }
    }

    public static let compatible = "swiftvmm,x86-64"
    public static let model = "SwiftVMM x86-64"
    /// The label (and so the phandle) of the IOAPIC node, every device's interrupt parent.
    static let ioapicLabel = "ioapic"
    static let apicWindow: UInt64 = 0x1000
    /// The I/O port space the ISA node maps (x86's 64 KiB).
    static let ioPortSpace: UInt64 = 0x1_0000

    /// The whole tree of a machine with `memorySize` bytes of RAM, `cpus` vCPUs and these devices.
    public static func tree(memorySize: UInt64, cpus: Int, boot: Boot, devices: [DeviceTreeNode]) -> DeviceTreeNode {
        var chosen: [DeviceTreeProperty] = [.string("bootargs", boot.commandLine)]
        if let initrd = boot.initrd {
            chosen += [.init("linux,initrd-start", .u64(initrd.lowerBound)), .init("linux,initrd-end", .u64(initrd.upperBound))]
        }
        let cpuNodes = (0..<cpus).map { id in
            DeviceTreeNode("cpu", properties: [.string("device_type", "cpu"), .reg(.id(UInt64(id)))])
        }
        let ram = Layout.ramRanges(size: memorySize)
        let reserved = reservedRanges(ram: ram, e820: Machine.e820Map(ram: ram))
        let ports = devices.filter { $0.regions.contains { $0.space == .io } }
        let others = devices.filter { !$0.regions.contains { $0.space == .io } }

        var nodes: [DeviceTreeNode] = [
            DeviceTreeNode("chosen", properties: chosen),
            DeviceTreeNode("cpus", children: cpuNodes, childAddressing: .cells(address: 1, size: 0)),
            DeviceTreeNode("memory", properties: [.string("device_type", "memory"),
                                                  .init("reg", .reg(ram.map { .memory($0.base, $0.size) }))]),
        ]
        if !reserved.isEmpty {
            nodes.append(DeviceTreeNode("reserved-memory", properties: [.flag("ranges")],
                                        children: reserved.map { DeviceTreeNode("firmware", properties: [.reg(.memory($0.lowerBound, $0.upperBound - $0.lowerBound)), .flag("no-map")]) },
                                        childAddressing: .cells(address: 2, size: 2)))
        }
        nodes += [
            DeviceTreeNode("interrupt-controller", properties: [
                .compatible("intel,ce4100-lapic"), .reg(.memory(Layout.localAPIC, apicWindow)), .flag("interrupt-controller"),
                .u32("#interrupt-cells", DeviceTreeInterrupt.cells), .u32("#address-cells", 0),
                // No IMCR: the local APICs start in virtual-wire mode, not PIC mode.
                .flag("intel,virtual-wire-mode"),
            ]),
            DeviceTreeNode("interrupt-controller", label: ioapicLabel, properties: [
                .compatible("intel,ce4100-ioapic"), .reg(.memory(Layout.ioAPIC, apicWindow)), .flag("interrupt-controller"),
                .u32("#interrupt-cells", DeviceTreeInterrupt.cells), .u32("#address-cells", 0),
            ]),
        ]
        if !ports.isEmpty {
            // dtc wants a unit address on a node with `ranges`: the ISA notation of the I/O space it
            // opens (its root address, 0, is memory@0's too).
            nodes.append(DeviceTreeNode("isa", unitAddress: "i0", properties: [
                .compatible("isa"), .string("device_type", "isa"),
                // I/O space (1, 0) onto the ports' own numbers, for 64 KiB (two child, two parent, one size cell).
                .init("ranges", .cells([1, 0, 0, 0, UInt32(ioPortSpace)])),
            ], children: ports, childAddressing: .isa))
        }
        nodes += others
        return DeviceTreeNode("", properties: [
            .compatible(compatible), .string("model", model), .init("interrupt-parent", .reference(ioapicLabel)),
        ], children: nodes, childAddressing: .cells(address: 2, size: 2))
    }

    /// The parts of guest RAM that e820 does not give the kernel as RAM (the EBDA, the legacy area
    /// with the ACPI tables and the BIOS area), in address order.
    static func reservedRanges(ram: [(base: UInt64, size: UInt64)], e820: [E820Entry]) -> [Range<UInt64>] {
        let usable: [Range<UInt64>] = e820.filter { $0.kind == .ram }.map { $0.address..<($0.address + $0.size) }
            .sorted { $0.lowerBound < $1.lowerBound }
        var result: [Range<UInt64>] = []
        for region in ram {
            var next = region.base
            let end = region.base + region.size
            for u in usable where u.upperBound > next && u.lowerBound < end {
                if u.lowerBound > next { result.append(next..<u.lowerBound) }
                next = max(next, u.upperBound)
            }
            if next < end { result.append(next..<end) }
        }
        return result
    }

    /// The tree as a DTB.
    public static func blob(memorySize: UInt64, cpus: Int, boot: Boot, devices: [DeviceTreeNode]) throws(PlatformDeviceTreeError) -> [UInt8] {
        do {
            return try FlattenedDeviceTree.encode(try tree(memorySize: memorySize, cpus: cpus, boot: boot, devices: devices).resolved())
        } catch let error as DeviceTreeError {
            throw PlatformDeviceTreeError(error.description)
        } catch {
            throw PlatformDeviceTreeError("\(error)")
        }
    }

    /// The DTB of a machine that will never run (`--dump-dtb`): its devices as `Platform.description`
    /// makes them (`virtio`: the kinds, in order, as for `PlatformTables.build`), no VM.
    public static func build(memorySize: UInt64, cpus: Int, boot: Boot, acpi: Bool = true, tpm: Bool = false,
                             virtio: [String] = []) throws(PlatformDeviceTreeError) -> [UInt8] {
        let devices: [DeviceTreeNode]
        do {
            let scratch = try GuestMemory(ranges: [(GuestAddress(0), Layout.highMemory)])
            devices = try Platform.description(memory: scratch, tpm: tpm, virtio: virtio, acpi: acpi).deviceTreeNodes
        } catch {
            throw PlatformDeviceTreeError("\(error)")
        }
        return try blob(memorySize: memorySize, cpus: cpus, boot: boot, devices: devices)
    }
}

/// Why the machine's device tree could not be made.
public struct PlatformDeviceTreeError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

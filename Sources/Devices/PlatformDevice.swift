import ACPI
import DeviceTree
import VMMCore

/// A register window of a platform device on one of the machine's buses.
public struct BusRegion: Sendable {
    public enum Space: Sendable, Equatable { case pio, mmio }
    public var space: Space
    /// The name in the bus map and in overlap errors ("com1", "acpi-pm1a-evt").
    public var name: String
    public var base: UInt64
    public var size: UInt64
    public var device: any BusDevice

    public static func pio(_ name: String, _ base: UInt64, _ size: UInt64, _ device: any BusDevice) -> BusRegion {
        BusRegion(space: .pio, name: name, base: base, size: size, device: device)
    }

    public static func mmio(_ name: String, _ base: UInt64, _ size: UInt64, _ device: any BusDevice) -> BusRegion {
        BusRegion(space: .mmio, name: name, base: base, size: size, device: device)
    }
}

/// Where a legacy ISA device sits: its first I/O port and its interrupt (GSI).
public struct PortPlacement: Sendable {
    public var port: UInt64
    public var gsi: UInt32
    public init(port: UInt64, gsi: UInt32) {
        self.port = port
        self.gsi = gsi
    }
}

/// A device of the machine's platform, declared in one place: the file of its model says where its
/// registers are (from the placement the machine gives it, whose numbers come from the machine's
/// layout), what its snapshot section is, what it adds to the DSDT and to the device tree, and what
/// it does after a restore. The machine registers each device once; the bus map, the snapshot's
/// device sections, the DSDT's devices and the device tree's are all derived from that one list.
public protocol PlatformDevice: AnyObject, Sendable {
    /// Its register windows (none for a device reached otherwise, like the VM generation ID).
    var busRegions: [BusRegion] { get }
    /// Its snapshot section: the name in state.bin ("dev.serial0") and the model that saves and
    /// restores the payload. Nil for a device without state.
    var snapshotSection: (name: String, device: any SnapshotDevice)? { get }
    /// What it adds under `\_SB` in the DSDT (nothing for a device the guest finds otherwise).
    var dsdtAML: [AML] { get }
    /// ACPI tables of its own (a TPM's TPM2 table), listed in the XSDT after the DSDT's SSDTs.
    var acpiTables: [SDT] { get }
    /// Its nodes in the machine's device tree (`--dump-dtb`, `--dtb`): nothing for a device that
    /// has no device-tree binding or that only ACPI can describe. A node whose `reg` is in I/O space
    /// goes under the machine's ISA bus node, any other under the root; `interrupts` are IOAPIC pins.
    var deviceTreeNodes: [DeviceTreeNode] { get }
    /// Runs once after a restore, when KVM's interrupt controller holds its saved state again:
    /// drives the device's interrupt line to the level its restored registers imply (the
    /// irqchip's saved state does not remember what a device holds a line at).
    func afterRestore()
}

extension PlatformDevice {
    public var busRegions: [BusRegion] { [] }
    public var snapshotSection: (name: String, device: any SnapshotDevice)? { nil }
    public var dsdtAML: [AML] { [] }
    public var acpiTables: [SDT] { [] }
    public var deviceTreeNodes: [DeviceTreeNode] { [] }
    public func afterRestore() {}
}

extension AML.Resource {
    /// A fixed I/O port range (`IO (Decode16, base, base, 1, length)`).
    public static func ports(_ base: UInt64, _ length: Int) -> [UInt8] {
        io(min: UInt16(base), max: UInt16(base), alignment: 1, length: UInt8(length))
    }
}

import ACPI
import Devices
@testable import Machine
import Testing
import TestSupport
import VMMCore
import WireFormat

/// The machine's devices are declared once: the buses, snapshot sections and DSDT come from one list.
@Suite("platform devices: one registration each")
struct PlatformDeviceTests {
    static func platform() throws -> Platform {
        try Platform.description(memory: GuestMemory(ranges: [(GuestAddress(0), 1 << 20)]))
    }

    @Test("the port and MMIO buses hold each device at its Layout address, nothing else")
    func busMap() throws {
        let p = try Self.platform()
        let ports = p.pio.entries.map { "\($0.name)@\(String($0.base, radix: 16))+\($0.size)" }
        #expect(ports.contains("com1@3f8+8") && ports.contains("i8042@60+5") && ports.contains("cmos@70+2"))
        #expect(ports.contains("fw_cfg@510+12") && ports.contains("reset-control@cf9+1"))
        #expect(ports.contains("acpi-pm1a-evt@600+4") && ports.contains("acpi-pm1a-cnt@604+2"))
        #expect(ports.contains("acpi-pm-tmr@608+4") && ports.contains("acpi-gpe0@620+\(Layout.gpe0Length)"))
        #expect(p.pio.entries.count == 9 + Layout.quietPorts.count, "\(ports)")
        #expect(p.mmio.entries.map { "\($0.name)@\(String($0.base, radix: 16))" } == ["fw_cfg@\(String(Layout.fwCfgMMIO, radix: 16))"])
    }

    @Test("snapshot sections and DSDT devices follow the registration order")
    func derivedLists() throws {
        let p = try Self.platform()
        #expect(p.snapshotSections.map(\.name) == ["dev.serial0", "dev.i8042", "dev.cmos", "dev.fw-cfg", "dev.acpi-pm", "dev.vmgenid"])
        // The DSDT's devices: COM1, PS2K, RTC, FWCF, PMRS (in its AML, each Device's name follows its package length).
        let dsdt = PlatformTables.dsdt(devices: p.dsdtDevices).bytes
        let text = String(decoding: dsdt.map { $0 >= 0x20 && $0 < 0x7F ? $0 : 0x2E }, as: UTF8.self)
        let order = ["COM1", "PS2K", "RTC_", "FWCF", "PMRS"].map { text.range(of: $0)?.lowerBound }
        #expect(order.allSatisfy { $0 != nil }, "\(text)")
        #expect(order.compactMap { $0 } == order.compactMap { $0 }.sorted())
    }

    /// A device made up for the test: one port window, a section, one DSDT entry.
    final class Widget: PlatformDevice, SnapshotDevice, BusDevice {
        static let snapshotName = "widget"
        static let snapshotVersion: UInt16 = 1
        static let oldestSnapshotVersion: UInt16 = 1
        let base: UInt64
        init(base: UInt64) { self.base = base }
        func saveSnapshot() -> [UInt8] { [] }
        func restoreSnapshot(_ payload: [UInt8], version: UInt16) throws(LEDecodeError) {}
        func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {}
        func write(offset: UInt64, data: UnsafeRawBufferPointer) {}
        var busRegions: [BusRegion] { [.pio("widget", base, 4, self)] }
        var snapshotSection: (name: String, device: any SnapshotDevice)? { ("dev.widget", self) }
        var dsdtAML: [AML] { [.device("WDGT", [.name("_HID", .eisaID("PNP0C02"))])] }
    }

    @Test("registering a device puts its windows on the bus, its section in snapshots, its AML in the DSDT; overlaps are refused")
    func registry() throws {
        var r = DeviceRegistry()
        try r.register(Widget(base: 0x100))
        #expect(r.pio.resolve(0x102)?.offset == 2)
        #expect(r.snapshotSections.map(\.name) == ["dev.widget"])
        #expect(r.dsdtDevices.count == 1)
        #expect(throws: BusError.overlap(name: "widget", base: 0x102, size: 4, existing: "widget")) {
            try r.register(Widget(base: 0x102))
        }
        #expect(r.devices.count == 1, "a refused device is not registered")
        // A model without a placement (as unit tests make them) is on no bus and adds no AML.
        try r.register(Serial16550(output: RecordingConsole(), irq: RecordingInterruptLine()))
        #expect(r.pio.entries.count == 1 && r.dsdtDevices.count == 1)
    }
}

import DeviceTree
import Devices
import Testing
import TestSupport
import VMMCore

private func be32(_ values: UInt32...) -> [UInt8] {
    values.flatMap { v in [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
}

/// A root with the usual two-cell addressing and `children`.
private func root(_ children: [DeviceTreeNode], properties: [DeviceTreeProperty] = []) -> DeviceTreeNode {
    DeviceTreeNode("", properties: properties, children: children, childAddressing: .cells(address: 2, size: 2))
}

@Suite("device tree model: values resolve to the bytes of the flattened format")
struct DeviceTreeModelTests {
    @Test("cells big-endian, strings NUL-terminated, string lists, 64-bit numbers, flags, bytes")
    func values() throws {
        let node = DeviceTreeNode("n", properties: [
            .init("cells", .cells([1, 0xA1B2_C3D4])), .string("s", "abc"), .init("list", .strings(["a", "bc"])),
            .init("big", .u64(0x1_2345_6789)), .flag("present"), .init("raw", .bytes([9, 8, 7])),
        ])
        let n = try #require(try root([node]).resolved().child("n"))
        #expect(n[property: "cells"] == be32(1, 0xA1B2_C3D4))
        #expect(n[property: "s"] == Array("abc\0".utf8))
        #expect(n[property: "list"] == Array("a\0bc\0".utf8))
        #expect(n[property: "big"] == be32(1, 0x2345_6789))
        #expect(n[property: "present"] == [])
        #expect(n[property: "raw"] == [9, 8, 7])
        #expect(n.properties.map(\.name) == ["cells", "s", "list", "big", "present", "raw"], "in the order given")
    }

    @Test("reg is written in the parent's format: 2+2 cells, ISA (space, address, size), identifiers with no size")
    func reg() throws {
        let tree = root([
            DeviceTreeNode("mem", properties: [.reg(.memory(0x1_0000_0000, 0x8000_0000), .memory(0xFEB0_0000, 0x200))]),
            DeviceTreeNode("isa", unitAddress: "i0", properties: [], children: [
                DeviceTreeNode("serial", properties: [.reg(.io(0x3F8, 8))]),
                DeviceTreeNode("window", properties: [.reg(.memory(0xA0000, 0x20000))]),
            ], childAddressing: .isa),
            DeviceTreeNode("cpus", children: [DeviceTreeNode("cpu", properties: [.reg(.id(3))])], childAddressing: .cells(address: 1, size: 0)),
        ])
        let r = try tree.resolved()
        #expect(r[property: "#address-cells"] == be32(2) && r[property: "#size-cells"] == be32(2))
        #expect(r.node(at: "/mem@100000000")?[property: "reg"] == be32(1, 0, 0, 0x8000_0000, 0, 0xFEB0_0000, 0, 0x200))
        #expect(r.node(at: "/isa@i0")?[property: "#address-cells"] == be32(2))
        #expect(r.node(at: "/isa@i0")?[property: "#size-cells"] == be32(1))
        #expect(r.node(at: "/isa@i0/serial@i3f8")?[property: "reg"] == be32(1, 0x3F8, 8))
        #expect(r.node(at: "/isa@i0/window@a0000")?[property: "reg"] == be32(0, 0xA0000, 0x20000))
        #expect(r.node(at: "/cpus/cpu@3")?[property: "reg"] == be32(3))
        #expect(r.node(at: "/cpus")?[property: "#size-cells"] == be32(0))
    }

    @Test("unit addresses: the first reg address in hex, i + hex for I/O ports, or as given")
    func unitAddresses() {
        #expect(DeviceTreeNode("virtio", properties: [.reg(.memory(0xFEB0_0200, 0x200))]).fullName == "virtio@feb00200")
        #expect(DeviceTreeNode("rtc", properties: [.reg(.io(0x70, 2))]).fullName == "rtc@i70")
        #expect(DeviceTreeNode("memory", properties: [.reg(.memory(0, 1 << 20))]).fullName == "memory@0")
        #expect(DeviceTreeNode("chosen").fullName == "chosen")
        #expect(DeviceTreeNode("isa", unitAddress: "i0").fullName == "isa@i0")
    }

    @Test("interrupts are the IOAPIC's <pin sense> pairs")
    func interrupts() throws {
        let node = DeviceTreeNode("d", properties: [.interrupts(.edge(16), .levelHigh(9), .init(pin: 3, sense: .levelLow))])
        let r = try #require(try root([node]).resolved().child("d"))
        #expect(r[property: "interrupts"] == be32(16, 0, 9, 2, 3, 1))
        #expect(DeviceTreeInterrupt.cells == 2)
    }

    @Test("references become phandles, numbered from 1 in tree order; a referenced node gets a phandle property, last")
    func phandles() throws {
        let tree = root([
            DeviceTreeNode("a", label: "first", properties: [.flag("x")]),
            DeviceTreeNode("b", label: "unused"),
            DeviceTreeNode("c", label: "second", properties: [.init("link", .reference("first"))]),
        ], properties: [.init("interrupt-parent", .reference("second"))])
        let r = try tree.resolved()
        #expect(r[property: "interrupt-parent"] == be32(2))
        #expect(r.child("a")?.properties.map(\.name) == ["x", "phandle"])
        #expect(r.child("a")?[property: "phandle"] == be32(1))
        #expect(r.child("b")?[property: "phandle"] == nil, "a label nothing refers to gets no phandle")
        #expect(r.child("c")?[property: "phandle"] == be32(2))
        #expect(r.child("c")?[property: "link"] == be32(1))
    }

    @Test("malformed trees are refused, naming the node and the problem")
    func malformed() {
        func problem(_ tree: DeviceTreeNode) -> String? {
            do { _ = try tree.resolved(); return nil } catch { return error.description }
        }
        let noAddressing = DeviceTreeNode("", children: [DeviceTreeNode("d", properties: [.reg(.memory(0x1000, 0x10))])])
        #expect(problem(noAddressing)?.contains("/d@1000: has a reg but its parent says nothing") == true)
        #expect(problem(root([DeviceTreeNode("d", properties: [.reg(.io(0x60, 1))])]))?.contains("I/O space, which only an ISA bus has") == true)
        let narrow = DeviceTreeNode("", children: [DeviceTreeNode("d", properties: [.reg(.memory(1 << 32, 0x10))])],
                                    childAddressing: .cells(address: 1, size: 1))
        #expect(problem(narrow)?.contains("does not fit 1 address and 1 size cells") == true)
        let sized = DeviceTreeNode("", children: [DeviceTreeNode("cpu", properties: [.reg(.memory(0, 4))])],
                                   childAddressing: .cells(address: 1, size: 0))
        #expect(problem(sized)?.contains("does not fit 1 address and 0 size cells") == true)
        #expect(problem(root([DeviceTreeNode("x"), DeviceTreeNode("x")]))?.contains("/x: two nodes of / have this name") == true)
        #expect(problem(root([DeviceTreeNode("x", properties: [.flag("p"), .flag("p")])]))?.contains("has the property p twice") == true)
        #expect(problem(root([DeviceTreeNode("bad name")]))?.contains("the name \"bad name\"") == true)
        #expect(problem(root([DeviceTreeNode(String(repeating: "n", count: 32))])) != nil, "32 characters is too long")
        #expect(problem(root([DeviceTreeNode(String(repeating: "n", count: 31))])) == nil)
        #expect(problem(root([DeviceTreeNode("x", properties: [.flag("bad/name")])]))?.contains("the property name") == true)
        #expect(problem(root([DeviceTreeNode("x", properties: [.string("s", "a\0b")])]))?.contains("a string with a NUL byte") == true)
        #expect(problem(root([DeviceTreeNode("x", unitAddress: "")]))?.contains("unit address") == true)
        #expect(problem(root([DeviceTreeNode("x", properties: [.init("p", .reference("nobody"))])]))?
            .contains("/x: refers to the label \"nobody\", which no node has") == true)
        #expect(problem(root([DeviceTreeNode("a", label: "l"), DeviceTreeNode("b", label: "l")]))?
            .contains("/b: label \"l\" is already the label of /a") == true)
        // #address-cells is the addressing's to write: a node cannot have it twice.
        let twice = DeviceTreeNode("", properties: [.u32("#address-cells", 2)], childAddressing: .cells(address: 2, size: 2))
        #expect(problem(twice)?.contains("#address-cells twice") == true)
    }

    @Test("an empty root resolves to just its addressing")
    func emptyRoot() throws {
        let r = try root([]).resolved()
        #expect(r.name == "" && r.children.isEmpty)
        #expect(r.properties.map(\.name) == ["#address-cells", "#size-cells"])
    }
}

@Suite("device tree nodes of the platform devices, from their placements")
struct DeviceNodesTests {
    @Test("COM1: ns16550a at its ports with the PC UART clock and an edge interrupt")
    func serial() {
        let s = Serial16550(output: RecordingConsole(), irq: RecordingInterruptLine(), placement: .init(port: 0x3F8, gsi: 4))
        #expect(s.deviceTreeNodes == [DeviceTreeNode("serial", properties: [
            .compatible("ns16550a"), .reg(.io(0x3F8, 8)), .u32("clock-frequency", 1_843_200), .interrupts(.edge(4)),
        ])])
        #expect(s.deviceTreeNodes.first?.fullName == "serial@i3f8")
        #expect(Serial16550(output: RecordingConsole(), irq: RecordingInterruptLine()).deviceTreeNodes.isEmpty, "no placement, no node")
    }

    @Test("the CMOS clock: motorola,mc146818 at its ports with the RTC interrupt")
    func rtc() {
        let c = CMOSClock(placement: .init(port: 0x70, gsi: 8)) { 0 }
        #expect(c.deviceTreeNodes == [DeviceTreeNode("rtc", properties: [.compatible("motorola,mc146818"), .reg(.io(0x70, 2)), .interrupts(.edge(8))])])
    }

    @Test("fw_cfg: qemu,fw-cfg-mmio with its MMIO window, DMA coherent")
    func fwCfg() throws {
        let memory = try GuestMemory(ranges: [(GuestAddress(0), 1 << 20)])
        let f = FwCfg(memory: memory, placement: .init(port: 0x510, mmio: 0xFEF0_0000))
        #expect(f.deviceTreeNodes == [DeviceTreeNode("fw-cfg", properties: [
            .compatible("qemu,fw-cfg-mmio"), .reg(.memory(0xFEF0_0000, FwCfg.mmioSize)), .flag("dma-coherent"),
        ])])
    }

    @Test("the TPM: tcg,tpm-tis-mmio over the five localities, no interrupt")
    func tpm() {
        final class NoTPM: TPMBackend {
            let info = TPMBackendInfo(kind: .builtin, path: "")
            let bufferSize = TPMTIS.maxBufferSize
            func submit(_ command: [UInt8], locality: UInt8, complete: @escaping @Sendable ([UInt8]) -> Void) {}
            func cancel() {}
            func waitUntilIdle(timeoutMilliseconds: Int) -> Bool { true }
        }
        let t = TPMTIS(backend: NoTPM(), placement: .init(base: 0xFED4_0000))
        #expect(t.deviceTreeNodes == [DeviceTreeNode("tpm", properties: [.compatible("tcg,tpm-tis-mmio"), .reg(.memory(0xFED4_0000, 0x5000))])])
        #expect(t.deviceTreeNodes.first?[property: "interrupts"] == nil)
    }

    @Test("the i8042, the ACPI fixed hardware and the VM generation ID have no node")
    func none() throws {
        let memory = try GuestMemory(ranges: [(GuestAddress(0), 1 << 20)])
        #expect(I8042(irq: RecordingInterruptLine(), placement: .init(port: 0x60, gsi: 1)) {}.deviceTreeNodes.isEmpty)
        let acpi = ACPIPowerManagement(gpeBlockLength: 4, s5SleepType: 5, sci: RecordingInterruptLine(), now: { 0 },
                                       onPowerOff: {}, onReset: {}, onUnsupportedSleep: { _ in },
                                       placement: .init(pm1aEvent: 0x600, pm1aControl: 0x604, pmTimer: 0x608, gpe0: 0x620, resetRegister: 0xCF9))
        #expect(acpi.deviceTreeNodes.isEmpty)
        #expect(VMGenID(guid: [UInt8](repeating: 1, count: 16), memory: memory, acpi: acpi).deviceTreeNodes.isEmpty)
    }
}

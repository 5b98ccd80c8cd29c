import BootLoader
import DeviceTree
import Devices
@testable import Machine
import Testing
import TestSupport
import VMMCore
import Virtio

private func be32(_ values: UInt32...) -> [UInt8] {
    values.flatMap { v in [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
}

private func be64(_ v: UInt64) -> [UInt8] { be32(UInt32(v >> 32), UInt32(truncatingIfNeeded: v)) }

private func string(_ bytes: [UInt8]?) -> String? {
    guard let bytes, bytes.last == 0 else { return nil }
    return String(decoding: bytes.dropLast(), as: UTF8.self)
}

@Suite("flattened device trees: libfdt's writer and reader")
struct FlattenedDeviceTreeTests {
    static let sample = DeviceTreeNode("", properties: [.compatible("test,one", "test"), .init("interrupt-parent", .reference("pic"))], children: [
        DeviceTreeNode("chosen", properties: [.string("bootargs", "console=ttyS0"), .init("linux,initrd-start", .u64(0x1234_5000))]),
        DeviceTreeNode("pic", label: "pic", properties: [.flag("interrupt-controller"), .u32("#interrupt-cells", 2)]),
        DeviceTreeNode("dev", properties: [.reg(.memory(0xFEB0_0000, 0x200)), .interrupts(.edge(16)), .init("blob", .bytes([]))]),
    ], childAddressing: .cells(address: 2, size: 2))

    @Test("decode(encode(tree)) is the tree: names, property order and bytes, nesting")
    func roundTrip() throws {
        let resolved = try Self.sample.resolved()
        let blob = try FlattenedDeviceTree.encode(resolved)
        #expect(Array(blob.prefix(4)) == [0xD0, 0x0D, 0xFE, 0xED], "FDT magic")
        #expect(Array(blob[20..<24]) == be32(17), "version 17")
        #expect(try FlattenedDeviceTree.decode(blob) == resolved)
    }

    @Test("the same tree gives the same bytes")
    func deterministic() throws {
        let a = try FlattenedDeviceTree.encode(try Self.sample.resolved())
        let b = try FlattenedDeviceTree.encode(try Self.sample.resolved())
        #expect(a == b)
    }

    @Test("a tree larger than the first buffer grows it (libfdt's NOSPACE) and still round-trips")
    func grows() throws {
        let big = DeviceTreeNode("", children: (0..<40).map { i in
            DeviceTreeNode("n\(i)", properties: [.init("data", .bytes((0..<1000).map { UInt8(truncatingIfNeeded: $0 &+ i) }))])
        })
        let resolved = try big.resolved()
        let blob = try FlattenedDeviceTree.encode(resolved)
        #expect(blob.count > 40_000)
        #expect(try FlattenedDeviceTree.decode(blob) == resolved)
    }

    @Test("a blob that is not a whole, sound tree is refused, never read past its end")
    func badBlobs() throws {
        let blob = try FlattenedDeviceTree.encode(try Self.sample.resolved())
        #expect(throws: FlattenedDeviceTree.Error.self) { try FlattenedDeviceTree.decode([]) }
        #expect(throws: FlattenedDeviceTree.Error.self) { try FlattenedDeviceTree.decode(Array(blob.prefix(blob.count - 1))) }
        #expect(throws: FlattenedDeviceTree.Error.self) { try FlattenedDeviceTree.decode(blob + [0, 0, 0, 0]) }
        var badMagic = blob
        badMagic[0] = 0
        #expect(throws: FlattenedDeviceTree.Error.self) { try FlattenedDeviceTree.decode(badMagic) }
        // Corrupted bytes anywhere: refused or read, never a crash.
        var rng = SplitMix64(state: 18)
        for _ in 0..<2000 {
            var b = blob
            for _ in 0..<Int(rng.next() % 4 + 1) { b[Int(rng.next() % UInt64(b.count))] = UInt8(truncatingIfNeeded: rng.next()) }
            _ = try? FlattenedDeviceTree.decode(b)
        }
    }
}

@Suite("the machine's device tree")
struct PlatformDeviceTreeTests {
    static func decoded(memory: UInt64 = 256 << 20, cpus: Int = 1, boot: PlatformDeviceTree.Boot = .init(commandLine: "console=ttyS0"),
                        tpm: Bool = false, virtio: [String] = ["rng"], acpi: Bool = true) throws -> ResolvedDeviceTreeNode {
        let blob = try PlatformDeviceTree.build(memorySize: memory, cpus: cpus, boot: boot, acpi: acpi, tpm: tpm, virtio: virtio)
        return try FlattenedDeviceTree.decode(blob)
    }

    @Test("memory reg is the guest RAM: one range, or split around the 32-bit MMIO hole")
    func memory() throws {
        #expect(try Self.decoded(memory: 256 << 20).node(at: "/memory@0")?[property: "reg"] == be64(0) + be64(256 << 20))
        #expect(try Self.decoded(memory: 3 << 30).node(at: "/memory@0")?[property: "reg"] == be64(0) + be64(3 << 30))
        let split = try Self.decoded(memory: 5 << 30).node(at: "/memory@0")
        #expect(split?[property: "reg"] == be64(0) + be64(3 << 30) + be64(4 << 30) + be64(2 << 30))
        #expect(string(split?[property: "device_type"]) == "memory")
        // What e820 keeps from the kernel (EBDA to 1 MiB) is reserved, not mapped.
        let reserved = try #require(try Self.decoded().node(at: "/reserved-memory/firmware@9fc00"))
        #expect(reserved[property: "reg"] == be64(0x9FC00) + be64(0x100000 - 0x9FC00))
        #expect(reserved[property: "no-map"] == [])
    }

    @Test("one cpu node per vCPU, reg = its APIC ID")
    func cpus() throws {
        for n in [1, 3, 254] {
            let cpus = try #require(try Self.decoded(cpus: n).node(at: "/cpus"))
            #expect(cpus.children.count == n)
            #expect(cpus[property: "#address-cells"] == be32(1) && cpus[property: "#size-cells"] == be32(0))
            for (i, cpu) in cpus.children.enumerated() {
                #expect(cpu.name == "cpu@\(String(i, radix: 16))")
                #expect(cpu[property: "reg"] == be32(UInt32(i)))
                #expect(string(cpu[property: "device_type"]) == "cpu")
            }
        }
    }

    @Test("chosen: bootargs is the command line; the initrd's start and end when there is one")
    func chosen() throws {
        let plain = try #require(try Self.decoded(boot: .init(commandLine: "console=ttyS0 quiet")).node(at: "/chosen"))
        #expect(string(plain[property: "bootargs"]) == "console=ttyS0 quiet")
        #expect(plain[property: "linux,initrd-start"] == nil && plain[property: "linux,initrd-end"] == nil)
        let withInitrd = try #require(try Self.decoded(boot: .init(commandLine: "", initrd: 0xF00_0000..<0xFF0_0123)).node(at: "/chosen"))
        #expect(string(withInitrd[property: "bootargs"]) == "")
        #expect(withInitrd[property: "linux,initrd-start"] == be64(0xF00_0000))
        #expect(withInitrd[property: "linux,initrd-end"] == be64(0xFF0_0123))
    }

    @Test("each virtio device: virtio,mmio with its Layout window and GSI; eight of them")
    func virtio() throws {
        let kinds = ["blk", "blk", "net", "net", "blk", "net", "rng", "con"]
        let root = try Self.decoded(virtio: kinds)
        let nodes = root.children.filter { $0.name.hasPrefix("virtio@") }
        #expect(nodes.count == 8)
        for (n, node) in nodes.enumerated() {
            let base = Layout.virtioMMIO + Layout.virtioStride * UInt64(n)
            #expect(node.name == "virtio@\(String(base, radix: 16))")
            #expect(string(node[property: "compatible"]) == "virtio,mmio")
            #expect(node[property: "reg"] == be64(base) + be64(VirtioMMIO.windowSize))
            #expect(node[property: "interrupts"] == be32(Layout.virtioFirstGSI + UInt32(n), 0), "edge, rising")
        }
        #expect(try Self.decoded(virtio: []).children.allSatisfy { !$0.name.hasPrefix("virtio") })
    }

    @Test("the TPM only with a TPM; the ISA devices, fw_cfg and the interrupt controllers always")
    func devices() throws {
        let with = try Self.decoded(tpm: true)
        #expect(string(with.node(at: "/tpm@fed40000")?[property: "compatible"]) == "tcg,tpm-tis-mmio")
        #expect(with.node(at: "/tpm@fed40000")?[property: "reg"] == be64(Layout.tpmTIS) + be64(0x5000))
        let without = try Self.decoded(tpm: false)
        #expect(without.children.allSatisfy { !$0.name.hasPrefix("tpm") })
        let serial = try #require(without.node(at: "/isa@i0/serial@i3f8"))
        #expect(serial[property: "reg"] == be32(1, UInt32(Layout.com1), 8))
        #expect(serial[property: "interrupts"] == be32(Layout.com1IRQ, 0))
        #expect(without.node(at: "/isa@i0/rtc@i70")?[property: "interrupts"] == be32(Layout.rtcIRQ, 0))
        #expect(without.node(at: "/isa@i0")?[property: "ranges"] == be32(1, 0, 0, 0, 0x10000))
        #expect(without.node(at: "/fw-cfg@fef00000")?[property: "reg"] == be64(Layout.fwCfgMMIO) + be64(FwCfg.mmioSize))
        // Every device's interrupt parent is the IOAPIC, through the root.
        let ioapic = try #require(without.node(at: "/interrupt-controller@fec00000"))
        #expect(string(ioapic[property: "compatible"]) == "intel,ce4100-ioapic")
        #expect(ioapic[property: "#interrupt-cells"] == be32(2))
        #expect(ioapic[property: "phandle"] == be32(1) && without[property: "interrupt-parent"] == be32(1))
        #expect(string(without.node(at: "/interrupt-controller@fee00000")?[property: "compatible"]) == "intel,ce4100-lapic")
    }

    @Test("the devices are the registered platform devices, in registration order")
    func fromRegistry() throws {
        let scratch = try GuestMemory(ranges: [(GuestAddress(0), 1 << 20)])
        let platform = try Platform.description(memory: scratch, tpm: true, virtio: ["blk", "rng"])
        let expected = platform.all.flatMap(\.deviceTreeNodes).map(\.fullName)
        #expect(expected == ["serial@i3f8", "rtc@i70", "fw-cfg@fef00000", "tpm@fed40000", "virtio@feb00000", "virtio@feb00200"])
        let root = try Self.decoded(tpm: true, virtio: ["blk", "rng"])
        let found = (root.node(at: "/isa@i0")?.children ?? []).map(\.name)
            + root.children.map(\.name).filter { ["fw-cfg", "tpm", "virtio"].contains($0.split(separator: "@").first.map(String.init) ?? "") }
        #expect(found == expected)
    }

    @Test("a machine with no devices still gives a sound tree (no ISA node); the same configuration the same bytes")
    func noDevicesAndDeterminism() throws {
        let bare = try FlattenedDeviceTree.decode(try PlatformDeviceTree.blob(memorySize: 64 << 20, cpus: 1, boot: .init(commandLine: ""), devices: []))
        #expect(bare.children.map(\.name) == ["chosen", "cpus", "memory@0", "reserved-memory", "interrupt-controller@fee00000",
                                              "interrupt-controller@fec00000"])
        let a = try PlatformDeviceTree.build(memorySize: 1 << 30, cpus: 4, boot: .init(commandLine: "x", initrd: 0x100000..<0x200000),
                                             tpm: true, virtio: ["blk", "rng"])
        let b = try PlatformDeviceTree.build(memorySize: 1 << 30, cpus: 4, boot: .init(commandLine: "x", initrd: 0x100000..<0x200000),
                                             tpm: true, virtio: ["blk", "rng"])
        #expect(a == b)
    }

    @Test("reserved ranges: what e820 does not give as RAM, inside guest RAM")
    func reservedRanges() {
        let ram: [(base: UInt64, size: UInt64)] = [(0, 3 << 30), (4 << 30, 1 << 30)]
        #expect(PlatformDeviceTree.reservedRanges(ram: ram, e820: Machine.e820Map(ram: ram)) == [0x9FC00..<0x100000])
        let e820 = [E820Entry(address: 0, size: 0x1000, kind: .ram), E820Entry(address: 0x3000, size: 0x1000, kind: .ram)]
        #expect(PlatformDeviceTree.reservedRanges(ram: [(0, 0x5000)], e820: e820) == [0x1000..<0x3000, 0x4000..<0x5000])
    }
}

@Suite("--dtb: the device tree in boot_params' setup_data", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct DeviceTreeBootTests {
    static func boot(deviceTree: Bool, initrd: [UInt8]? = nil) throws -> Machine {
        var config = MachineConfig(memorySize: 128 << 20, cpus: 2, console: RecordingConsole())
        config.virtio = [.rng]
        config.deviceTree = deviceTree
        return try Machine(config, boot: .linux(kernel: try BzImage(syntheticBzImage()), initrd: initrd, commandLine: "console=ttyS0 dtb"))
    }

    @Test("hdr.setup_data points at one SETUP_DTB entry: type 2, len the blob's, the tree --dump-dtb writes for this configuration")
    func setupData() throws {
        let initrd = [UInt8](repeating: 0xAB, count: 10_000)
        let machine = try Self.boot(deviceTree: true, initrd: initrd)
        let params = try machine.memory.read(GuestAddress(Layout.bootParams), count: 4096)
        let pointer = (0..<8).reduce(UInt64(0)) { $0 | UInt64(params[0x250 + $1]) << (8 * UInt64($1)) }
        #expect(pointer == Layout.setupData)
        let header = try machine.memory.read(GuestAddress(pointer), count: 16)
        let length = (0..<4).reduce(0) { $0 | Int(header[12 + $1]) << (8 * $1) }
        let region = try machine.memory.read(GuestAddress(pointer), count: 16 + length)
        let entries = try #require(SetupData.parse(region, at: pointer))
        #expect(entries.count == 1)
        #expect(entries.first?.type == 2)
        let blob = try #require(entries.first?.payload)
        #expect(blob.count == length)
        // The initrd the boot placed, as the dump (which plans the same boot) says.
        let image = try BzImage(syntheticBzImage())
        let plan = try Machine.linuxBootPlan(image: image, commandLine: "console=ttyS0 dtb", initrdSize: UInt64(initrd.count), memorySize: 128 << 20)
        let dumped = try PlatformDeviceTree.build(memorySize: 128 << 20, cpus: 2,
                                                  boot: .init(commandLine: "console=ttyS0 dtb", initrd: plan.initrdRange(size: UInt64(initrd.count))),
                                                  virtio: ["rng"])
        #expect(blob == dumped)
        let tree = try FlattenedDeviceTree.decode(blob)
        let start = try #require(plan.initrdAddress)
        #expect(tree.node(at: "/chosen")?[property: "linux,initrd-start"] == be64(start))
        #expect(try machine.memory.read(GuestAddress(start), count: 4) == [0xAB, 0xAB, 0xAB, 0xAB])
    }

    @Test("without --dtb there is no setup_data")
    func none() throws {
        let machine = try Self.boot(deviceTree: false)
        let params = try machine.memory.read(GuestAddress(Layout.bootParams + 0x250), count: 8)
        #expect(params == [UInt8](repeating: 0, count: 8))
    }
}

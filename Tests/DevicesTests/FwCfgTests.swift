import Devices
import FuzzEntries
import Foundation
import Synchronization
import Testing
import TestSupport
import VMMCore
import WireFormat

/// Records the calls of a writable file's handler.
final class WriteLog: Sendable {
    struct Call: Equatable {
        let offset: Int
        let bytes: [UInt8]
        let whole: [UInt8]
    }
    private let log = Mutex<[Call]>([])
    var calls: [Call] { log.withLock { $0 } }
    var handler: FwCfg.WriteHandler {
        { offset, bytes, whole in self.log.withLock { $0.append(Call(offset: offset, bytes: bytes, whole: whole)) } }
    }
}

func bigEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    (0..<MemoryLayout<T>.size).reversed().map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
}

@Suite("fw_cfg through the bus harness")
struct FwCfgTests {
    let memory: GuestMemory
    let fw: FwCfg
    let log = WriteLog()
    var bus = BusHarness()
    let base = FwCfg.portBase
    let table: [UInt8] = Array("ACPI tables".utf8)
    let descriptorAddress: UInt64 = 0x1000
    let bufferAddress: UInt64 = 0x2000

    init() throws {
        memory = try GuestMemory(ranges: [(GuestAddress(0), 16 << 20)])
        fw = FwCfg(memory: memory)
        try fw.addFile("opt/zeta", data: [1, 2, 3])
        try fw.addFile("etc/alpha", data: table)
        try fw.addWritableFile("etc/beta", size: 8, onWrite: log.handler)
        try bus.attach(fw.ports, at: base, size: FwCfg.portSize)
    }

    // MARK: Guest-side helpers

    func select(_ key: UInt16) { bus.write(base, size: 2, value: UInt64(key)) }
    func readData(_ count: Int) -> [UInt8] { (0..<count).map { _ in bus.read8(base + 1) } }

    /// Writes a descriptor and starts it the way Linux does: `iowrite32be(hi)`, then `iowrite32be(lo)`.
    @discardableResult
    func dma(control: UInt32, length: UInt32, address: UInt64, at descriptor: UInt64? = nil) throws -> UInt32 {
        let at = descriptor ?? descriptorAddress
        try memory.write(bigEndian(control) + bigEndian(length) + bigEndian(address), at: GuestAddress(at))
        bus.write(base + 4, size: 4, value: UInt64(UInt32(at >> 32).byteSwapped))
        bus.write(base + 8, size: 4, value: UInt64(UInt32(truncatingIfNeeded: at).byteSwapped))
        return try memory.read(UInt32.self, at: GuestAddress(at)).byteSwapped
    }

    func key(_ name: String) throws -> UInt32 { UInt32(try #require(fw.selector(ofFile: name))) }

    // MARK: Port I/O

    @Test("signature: a 16-bit selector write, then byte reads of the data port")
    func signature() {
        select(0x0000)
        #expect(readData(4) == Array("QEMU".utf8))
    }

    @Test("FW_CFG_ID announces the traditional and the DMA interface")
    func id() {
        select(0x0001)
        #expect(readData(4) == [0x03, 0, 0, 0])
    }

    @Test("the DMA register reads \"QEMU CFG\" in byte order")
    func dmaSignature() {
        #expect((4..<12).map { bus.read8(base + $0) } == Array("QEMU CFG".utf8))
        #expect(bus.read(base + 4, size: 4) == 0x554D_4551) // "QEMU" as a little-endian u32
    }

    @Test("file directory: BE count, 64-byte entries sorted by name, selectors from 0x20 in insertion order")
    func directory() {
        select(FwCfg.fileDirKey)
        let dir = readData(4 + 3 * 64)
        func entry(_ size: UInt32, _ key: UInt16, _ name: String) -> [UInt8] {
            bigEndian(size) + bigEndian(key) + [0, 0] + Array(name.utf8) + [UInt8](repeating: 0, count: 56 - name.utf8.count)
        }
        let expected = bigEndian(UInt32(3))
            + entry(UInt32(table.count), 0x21, "etc/alpha")
            + entry(8, 0x22, "etc/beta")
            + entry(3, 0x20, "opt/zeta")
        #expect(dir == expected)
        #expect(readData(2) == [0, 0])
        #expect(fw.fileNames == ["opt/zeta", "etc/alpha", "etc/beta"])
        #expect(fw.selector(ofFile: "etc/beta") == 0x22)
        #expect(fw.selector(ofFile: "nope") == nil)
    }

    @Test("reads past the end of an item and of unknown selectors return zeros")
    func zeros() {
        select(0x20)
        #expect(readData(6) == [1, 2, 3, 0, 0, 0])
        select(0x1234)
        #expect(readData(4) == [0, 0, 0, 0])
    }

    @Test("legacy numeric items")
    func legacyItem() {
        fw.addItem(key: 0x0005, data: [4, 0])
        select(0x0005)
        #expect(readData(3) == [4, 0, 0])
    }

    @Test("a selector write restarts the item; data-port writes are ignored")
    func selectorAndDataWrites() {
        select(0x20)
        #expect(readData(2) == [1, 2])
        select(0x20)
        bus.write8(base + 1, 0xAA)
        #expect(readData(3) == [1, 2, 3])
        select(0x22)
        bus.write8(base + 1, 0xAA)
        #expect(fw.fileData("etc/beta") == [UInt8](repeating: 0, count: 8))
        #expect(log.calls.isEmpty)
    }

    @Test("every offset and access size is safe", arguments: [1, 2, 4, 8])
    func anyAccess(size: Int) {
        for offset: UInt64 in 0..<FwCfg.portSize {
            bus.write(base + offset, size: size, value: 0xFFFF_FFFF_FFFF_FFFF)
            _ = bus.read(base + offset, size: size)
        }
        #expect(fw.fileData("etc/beta") == [UInt8](repeating: 0, count: 8))
    }

    // MARK: DMA

    @Test("DMA read of the selected file; control becomes 0 and the register reads the signature again")
    func dmaRead() throws {
        select(0x21)
        #expect(try dma(control: FwCfg.dmaRead, length: UInt32(table.count), address: bufferAddress) == 0)
        #expect(try memory.read(GuestAddress(bufferAddress), count: table.count) == table)
        #expect(bus.read(base + 4, size: 4) == 0x554D_4551)
    }

    @Test("DMA SELECT in the control word, then a read past the end zero-fills")
    func dmaSelectRead() throws {
        try memory.fill(GuestAddress(bufferAddress), count: 8, with: 0xFF)
        let control = try key("opt/zeta") << 16 | FwCfg.dmaSelect | FwCfg.dmaRead
        #expect(try dma(control: control, length: 6, address: bufferAddress) == 0)
        #expect(try memory.read(GuestAddress(bufferAddress), count: 8) == [1, 2, 3, 0, 0, 0, 0xFF, 0xFF])
    }

    @Test("DMA SKIP, then a READ continues from the new offset, then PIO continues after it")
    func dmaSkipRead() throws {
        #expect(try dma(control: try key("etc/alpha") << 16 | FwCfg.dmaSelect | FwCfg.dmaSkip, length: 5, address: 0) == 0)
        #expect(try dma(control: FwCfg.dmaRead, length: 3, address: bufferAddress) == 0)
        #expect(try memory.read(GuestAddress(bufferAddress), count: 3) == Array(table[5..<8]))
        #expect(readData(1) == [table[8]])
    }

    @Test("DMA write to a writable file updates it and calls the handler")
    func dmaWrite() throws {
        try memory.write([0xDE, 0xAD, 0xBE, 0xEF], at: GuestAddress(bufferAddress))
        let beta = try key("etc/beta")
        #expect(try dma(control: beta << 16 | FwCfg.dmaSelect | FwCfg.dmaSkip, length: 2, address: 0) == 0)
        #expect(try dma(control: FwCfg.dmaWrite, length: 4, address: bufferAddress) == 0)
        let content: [UInt8] = [0, 0, 0xDE, 0xAD, 0xBE, 0xEF, 0, 0]
        #expect(fw.fileData("etc/beta") == content)
        #expect(log.calls == [WriteLog.Call(offset: 2, bytes: [0xDE, 0xAD, 0xBE, 0xEF], whole: content)])
        select(UInt16(beta))
        #expect(readData(8) == content)
    }

    @Test("DMA write to a read-only file or past the end of a writable one sets ERROR")
    func dmaWriteRejected() throws {
        try memory.write([UInt8](repeating: 0x55, count: 16), at: GuestAddress(bufferAddress))
        let alpha = try key("etc/alpha"), beta = try key("etc/beta")
        #expect(try dma(control: alpha << 16 | FwCfg.dmaSelect | FwCfg.dmaWrite, length: 4, address: bufferAddress) == FwCfg.dmaError)
        #expect(fw.fileData("etc/alpha") == table)
        #expect(try dma(control: beta << 16 | FwCfg.dmaSelect | FwCfg.dmaWrite, length: 9, address: bufferAddress) == FwCfg.dmaError)
        #expect(try dma(control: beta << 16 | FwCfg.dmaSelect | FwCfg.dmaSkip, length: 4, address: 0) == 0)
        #expect(try dma(control: FwCfg.dmaWrite, length: 5, address: bufferAddress) == FwCfg.dmaError)
        #expect(try dma(control: 0x7777 << 16 | FwCfg.dmaSelect | FwCfg.dmaWrite, length: 1, address: bufferAddress) == FwCfg.dmaError)
        #expect(fw.fileData("etc/beta") == [UInt8](repeating: 0, count: 8))
        #expect(log.calls.isEmpty)
    }

    @Test("DMA to or from addresses outside guest RAM, or wrapping around, sets ERROR")
    func dmaOutsideRAM() throws {
        let alpha = try key("etc/alpha") << 16 | FwCfg.dmaSelect, beta = try key("etc/beta") << 16 | FwCfg.dmaSelect
        #expect(try dma(control: alpha | FwCfg.dmaRead, length: 4, address: 1 << 32) == FwCfg.dmaError)
        #expect(try dma(control: alpha | FwCfg.dmaRead, length: 0x20, address: (16 << 20) - 0x10) == FwCfg.dmaError)
        #expect(try dma(control: alpha | FwCfg.dmaRead, length: 0x100, address: 0xFFFF_FFFF_FFFF_FF80) == FwCfg.dmaError)
        #expect(try dma(control: beta | FwCfg.dmaWrite, length: 8, address: 0xFFFF_FFFF_FFFF_FFFC) == FwCfg.dmaError)
        #expect(log.calls.isEmpty)
    }

    @Test("a descriptor outside guest RAM is dropped without a trap")
    func descriptorOutsideRAM() throws {
        for address: UInt64 in [16 << 20, (16 << 20) - 8, 0xFFFF_FFFF_FFFF_FFF8] {
            bus.write(base + 4, size: 4, value: UInt64(UInt32(address >> 32).byteSwapped))
            bus.write(base + 8, size: 4, value: UInt64(UInt32(truncatingIfNeeded: address).byteSwapped))
        }
        select(0x0000)
        #expect(readData(4) == Array("QEMU".utf8))
    }

    @Test("a 4 GiB read fails at once; a 12 MiB read is zero-filled and bounded")
    func hugeLengths() throws {
        let alpha = try key("etc/alpha") << 16 | FwCfg.dmaSelect | FwCfg.dmaRead
        let elapsed = try ContinuousClock().measure {
            #expect(try dma(control: alpha, length: 0xFFFF_FFFF, address: bufferAddress) == FwCfg.dmaError)
            try memory.fill(GuestAddress(0x40_0000), count: 12 << 20, with: 0xFF)
            #expect(try dma(control: alpha, length: 12 << 20, address: 0x40_0000) == 0)
        }
        #expect(try memory.read(GuestAddress(0x40_0000), count: table.count + 2) == table + [0, 0])
        #expect(try memory.read(GuestAddress(0x40_0000 + (12 << 20) - 4), count: 4) == [0, 0, 0, 0])
        #expect(elapsed < .seconds(5))
    }

    @Test("a descriptor with no operation completes with length 0")
    func dmaNoOperation() throws {
        #expect(try dma(control: try key("etc/alpha") << 16 | FwCfg.dmaSelect, length: 100, address: 1 << 40) == 0)
        #expect(readData(2) == Array(table[0..<2]))
    }

    @Test("Linux's vmcoreinfo write: directory lookup by PIO, then one DMA SELECT|WRITE")
    func vmcoreinfo() throws {
        try fw.addWritableFile("etc/vmcoreinfo", size: 16, onWrite: log.handler)
        // The driver reads the directory byte by byte to find the selector.
        select(FwCfg.fileDirKey)
        let count = readData(4).reduce(0) { $0 << 8 | Int($1) }
        var selector: UInt16?
        for _ in 0..<count {
            let e = readData(64)
            if String(decoding: e[8...].prefix { $0 != 0 }, as: UTF8.self) == "etc/vmcoreinfo" {
                selector = UInt16(e[4]) << 8 | UInt16(e[5])
            }
        }
        let vmcoreinfoKey = UInt32(try #require(selector))
        // struct fw_cfg_vmcoreinfo { le16 host_format; le16 guest_format = 1 (ELF); le32 size; le64 paddr; }
        let note: [UInt8] = [0, 0, 1, 0, 0x00, 0x10, 0, 0, 0x00, 0x50, 0x34, 0x12, 0, 0, 0, 0]
        try memory.write(note, at: GuestAddress(bufferAddress))
        #expect(try dma(control: vmcoreinfoKey << 16 | FwCfg.dmaSelect | FwCfg.dmaWrite, length: 16, address: bufferAddress) == 0)
        #expect(fw.fileData("etc/vmcoreinfo") == note)
        #expect(log.calls == [WriteLog.Call(offset: 0, bytes: note, whole: note)])
    }

    // MARK: MMIO window

    @Test("the MMIO window: big-endian selector at +0, data at +1, DMA at +4 (halves or one 8-byte write)")
    func mmioWindow() throws {
        var mmio = BusHarness()
        let mbase: UInt64 = 0xFEF0_0000
        try mmio.attach(fw.mmio, at: mbase, size: FwCfg.mmioSize)
        mmio.write(mbase, size: 2, value: UInt64(UInt16(0x0000).byteSwapped))
        #expect((0..<4).map { _ in mmio.read8(mbase + 1) } == Array("QEMU".utf8))
        mmio.write(mbase, size: 2, value: UInt64(UInt16(0x0021).byteSwapped))
        #expect(mmio.read8(mbase + 1) == table[0])
        #expect((4..<12).map { mmio.read8(mbase + $0) } == Array("QEMU CFG".utf8))

        let control = try key("opt/zeta") << 16 | FwCfg.dmaSelect | FwCfg.dmaRead
        try memory.write(bigEndian(control) + bigEndian(UInt32(3)) + bigEndian(bufferAddress), at: GuestAddress(descriptorAddress))
        mmio.write(mbase + 4, size: 8, value: descriptorAddress.byteSwapped)
        #expect(try memory.read(UInt32.self, at: GuestAddress(descriptorAddress)) == 0)
        #expect(try memory.read(GuestAddress(bufferAddress), count: 3) == [1, 2, 3])

        try memory.write(bigEndian(control) + bigEndian(UInt32(2)) + bigEndian(bufferAddress + 8), at: GuestAddress(descriptorAddress))
        mmio.write(mbase + 4, size: 4, value: 0)
        mmio.write(mbase + 8, size: 4, value: UInt64(UInt32(descriptorAddress).byteSwapped))
        #expect(try memory.read(UInt32.self, at: GuestAddress(descriptorAddress)) == 0)
        #expect(try memory.read(GuestAddress(bufferAddress + 8), count: 2) == [1, 2])

        for offset: UInt64 in 0..<FwCfg.mmioSize {
            for size in [1, 2, 4, 8] { _ = mmio.read(mbase + offset, size: size) }
        }
    }

    // MARK: Configuration and state

    @Test("file configuration errors")
    func configurationErrors() throws {
        #expect(throws: FwCfgError.duplicateFile("etc/alpha")) { try fw.addFile("etc/alpha", data: []) }
        let long = String(repeating: "x", count: 56)
        #expect(throws: FwCfgError.invalidName(long)) { try fw.addFile(long, data: []) }
        #expect(throws: FwCfgError.invalidName("")) { try fw.addFile("", data: []) }
        try fw.addFile(String(repeating: "y", count: 55), data: [])
        #expect(throws: FwCfgError.invalidSize(file: "w", size: -1)) { try fw.addWritableFile("w", size: -1, onWrite: log.handler) }
        #expect(throws: FwCfgError.unknownFile("nope")) { try fw.replaceFileData("nope", []) }
        #expect(throws: FwCfgError.sizeMismatch(file: "etc/beta", expected: 8, actual: 7)) {
            try fw.replaceFileData("etc/beta", [UInt8](repeating: 1, count: 7))
        }
        try fw.replaceFileData("etc/beta", [UInt8](repeating: 1, count: 8))
        #expect(fw.fileData("etc/beta") == [UInt8](repeating: 1, count: 8))
        #expect(log.calls.isEmpty)
        #expect(FwCfgError.sizeMismatch(file: "f", expected: 8, actual: 7).description == "fw_cfg file \"f\" is 8 bytes, not 7")
    }

    @Test("host writes to a writable file act like DMA writes and leave the registers alone")
    func hostWrite() throws {
        select(0x20)
        _ = readData(1)
        try fw.writeFile("etc/beta", offset: 6, [1, 2])
        let content: [UInt8] = [0, 0, 0, 0, 0, 0, 1, 2]
        #expect(fw.fileData("etc/beta") == content)
        #expect(log.calls == [WriteLog.Call(offset: 6, bytes: [1, 2], whole: content)])
        #expect(throws: FwCfgError.notWritable("etc/alpha")) { try fw.writeFile("etc/alpha", offset: 0, [1]) }
        #expect(throws: FwCfgError.unknownFile("nope")) { try fw.writeFile("nope", offset: 0, [1]) }
        #expect(throws: FwCfgError.outOfRange(file: "etc/beta", offset: 7, length: 2, size: 8)) {
            try fw.writeFile("etc/beta", offset: 7, [1, 2])
        }
        #expect(throws: FwCfgError.outOfRange(file: "etc/beta", offset: -1, length: 1, size: 8)) {
            try fw.writeFile("etc/beta", offset: -1, [1])
        }
        #expect(log.calls.count == 1)
        #expect(readData(2) == [2, 3])
    }

    @Test("save and restore: registers, offset and writable files survive a JSON round trip")
    func saveRestore() throws {
        try memory.write([9, 8, 7], at: GuestAddress(bufferAddress))
        #expect(try dma(control: try key("etc/beta") << 16 | FwCfg.dmaSelect | FwCfg.dmaWrite, length: 3, address: bufferAddress) == 0)
        select(0x21)
        _ = readData(4)
        bus.write(base + 4, size: 4, value: UInt64(UInt32(0x12).byteSwapped)) // a half-written DMA address
        let saved = fw.saveState()
        #expect(saved.selector == 0x21 && saved.offset == 4 && saved.dmaAddress == 0x12 << 32)
        #expect(saved.writableFiles == ["etc/beta": [9, 8, 7, 0, 0, 0, 0, 0]])

        let decoded = try JSONDecoder().decode(FwCfg.State.self, from: JSONEncoder().encode(saved))
        let other = FwCfg(memory: memory)
        try other.addFile("opt/zeta", data: [1, 2, 3])
        try other.addFile("etc/alpha", data: table)
        try other.addWritableFile("etc/beta", size: 8, onWrite: log.handler)
        try other.restoreState(decoded)
        #expect(other.saveState() == saved)
        #expect(other.fileData("etc/beta") == [9, 8, 7, 0, 0, 0, 0, 0])
        var otherBus = BusHarness()
        try otherBus.attach(other.ports, at: base, size: FwCfg.portSize)
        #expect(otherBus.read8(base + 1) == table[4])
        #expect(log.calls.count == 1)
    }

    @Test("restore rejects states that do not fit the device")
    func restoreValidation() throws {
        var s = fw.saveState()
        s.writableFiles["etc/beta"] = [1, 2, 3]
        #expect(throws: LEDecodeError.invalid(field: "fwcfg.file etc/beta", reason: "3 bytes, this device's file has 8")) {
            try fw.restoreState(s)
        }
        s = fw.saveState()
        s.writableFiles["etc/alpha"] = table
        #expect(throws: LEDecodeError.invalid(field: "fwcfg.file name", reason: "\"etc/alpha\" is not a writable file of this device")) {
            try fw.restoreState(s)
        }
        s = fw.saveState()
        s.writableFiles = [:]
        #expect(throws: LEDecodeError.self) { try fw.restoreState(s) }
        s = fw.saveState()
        s.selector = 0x20
        s.offset = 4
        #expect(throws: LEDecodeError.self) { try fw.restoreState(s) }
        s = fw.saveState()
        #expect(s.selector == 0 && s.offset == 0 && s.writableFiles == ["etc/beta": [UInt8](repeating: 0, count: 8)])
    }

    @Test("the fuzz entry point survives thousands of seeded random inputs")
    func fuzzSmoke() {
        var rng = SplitMix64(state: 0xF00D)
        for _ in 0..<3000 {
            let input = (0..<Int.random(in: 0...256, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            Fuzz.fwCfgDMA(input)
        }
    }
}

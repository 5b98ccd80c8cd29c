import Devices
import VMMCore
import WireFormat

extension Fuzz {
    /// `fuzz-fwcfg-dma`: builds a device over 1 MiB of guest RAM with a legacy item, a read-only and
    /// a writable file, then interprets `data` as guest actions until it runs out. Each action is an
    /// opcode byte whose bits 0-1 choose: 0 a selector write (2 bytes), 1 a register read (a byte
    /// giving the offset in bits 0-4 and the size 1, 2, 4 or 8 in bits 5-6), 2 a DMA descriptor
    /// (slot u16, control u32, length u32, address u64) placed in RAM at slot * 16 and started,
    /// 3 a raw register write (the same offset/size byte, then 8 value bytes). Bit 7 of the opcode
    /// picks the MMIO window instead of the ports; for DMA, bit 2 keeps the length below 64 KiB, bit 3
    /// the address inside RAM, and bit 4 the selected key among 0x0000, 0x0001, 0x0020 and 0x0021.
    /// It must never trap.
    public static func fwCfgDMA(_ data: [UInt8]) {
        guard let memory = try? GuestMemory(ranges: [(GuestAddress(0), 1 << 20)]) else { return }
        let fw = FwCfg(memory: memory)
        fw.addItem(key: 0x0005, data: [2, 0])
        try? fw.addFile("etc/table", data: (0..<300).map { UInt8(truncatingIfNeeded: $0) })
        try? fw.addWritableFile("etc/addr", size: 8) { _, _, _ in }
        let windows = [fw.ports, fw.mmio]
        var input = data[...]
        func take(_ count: Int) -> UInt64 {
            var v: UInt64 = 0
            for i in 0..<count { v |= UInt64(input.popFirst() ?? 0) << (8 * i) }
            return v
        }
        func access(_ how: UInt64) -> (offset: UInt64, size: Int) { (how & 0x1F, 1 << Int(how >> 5 & 3)) }
        func write(_ window: FwCfgRegisters, _ offset: UInt64, _ bytes: [UInt8]) {
            bytes.withUnsafeBytes { window.write(offset: offset, data: $0) }
        }
        while let op = input.popFirst() {
            let window = windows[Int(op >> 7)]
            switch op & 3 {
            case 0:
                write(window, FwCfg.selectorOffset, littleEndianBytes(UInt16(truncatingIfNeeded: take(2))))
            case 1:
                let (offset, size) = access(take(1))
                var buffer = [UInt8](repeating: 0, count: size)
                buffer.withUnsafeMutableBytes { window.read(offset: offset, data: $0) }
            case 2:
                let slot = take(2) << 4
                var control = UInt32(truncatingIfNeeded: take(4))
                var length = UInt32(truncatingIfNeeded: take(4))
                var address = take(8)
                if op & 0x04 != 0 { length &= 0xFFFF }
                if op & 0x08 != 0 { address &= 0xF_FFFF }
                if op & 0x10 != 0 { control &= 0x0021_FFFF }
                let descriptor = bigEndianBytes(control) + bigEndianBytes(length) + bigEndianBytes(address)
                try? memory.write(descriptor, at: GuestAddress(slot))
                write(window, FwCfg.dmaHighOffset, bigEndianBytes(UInt32(slot >> 32)))
                write(window, FwCfg.dmaLowOffset, bigEndianBytes(UInt32(truncatingIfNeeded: slot)))
            default:
                let (offset, size) = access(take(1))
                write(window, offset, Array(littleEndianBytes(take(8)).prefix(size)))
            }
        }
    }
}

/// The big-endian bytes of `value` (fw_cfg DMA descriptors and address registers are big-endian).
func bigEndianBytes<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    (0..<MemoryLayout<T>.size).reversed().map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
}

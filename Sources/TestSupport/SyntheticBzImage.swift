/// Builds a minimal bzImage-shaped byte array with a plausible setup header.
public func syntheticBzImage(version: UInt16 = 0x020F, setupSects: UInt8 = 4, payload: Int = 4096,
                             initSize: UInt32 = 0x0200_0000, xloadflags: UInt16 = 0x3, loadflags: UInt8 = 0x1,
                             patch: (inout [UInt8]) -> Void = { _ in }) -> [UInt8] {
    var b = [UInt8](repeating: 0, count: (Int(setupSects) + 1) * 512 + payload)
    func put16(_ v: UInt16, _ o: Int) { b[o] = UInt8(v & 0xFF); b[o + 1] = UInt8(v >> 8) }
    func put32(_ v: UInt32, _ o: Int) { for i in 0..<4 { b[o + i] = UInt8((v >> (8 * i)) & 0xFF) } }
    func put64(_ v: UInt64, _ o: Int) { for i in 0..<8 { b[o + i] = UInt8((v >> (8 * i)) & 0xFF) } }
    b[0x1F1] = setupSects
    put16(0xAA55, 0x1FE)
    b[0x200] = 0xEB; b[0x201] = 0x6A // jmp: header ends at 0x26C
    put32(0x5372_6448, 0x202)
    put16(version, 0x206)
    b[0x211] = loadflags
    put32(0x7FFF_FFFF, 0x22C)  // initrd_addr_max
    put32(0x20_0000, 0x230)    // kernel_alignment
    b[0x234] = 1               // relocatable
    put16(xloadflags, 0x236)
    put32(2048, 0x238)         // cmdline_size
    put64(0x100_0000, 0x258)   // pref_address
    put32(initSize, 0x260)
    for i in 0..<payload { b[(Int(setupSects) + 1) * 512 + i] = UInt8(truncatingIfNeeded: i) }
    patch(&b)
    return b
}

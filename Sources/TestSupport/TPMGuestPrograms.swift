import Synchronization
import VMMCore
import VMMSys

/// A console that records when each byte arrived (tiny-guest TPM tests time guest events by the
/// markers the guest prints).
public final class TimestampConsole: ConsoleOutput, @unchecked Sendable {
    let bytes = Mutex<[(UInt64, UInt8)]>([])
    public init() {}

    public func write(_ data: UnsafeRawBufferPointer) {
        let now = monotonicNanoseconds()
        bytes.withLock { b in for x in data { b.append((now, x)) } }
    }

    /// When `marker` first arrived.
    public func time(of marker: UInt8) -> UInt64? { bytes.withLock { $0.first { $0.1 == marker }?.0 } }

    /// The `count` bytes after the first `marker`.
    public func bytes(after marker: UInt8, count: Int) -> [UInt8] {
        bytes.withLock { b in
            guard let i = b.firstIndex(where: { $0.1 == marker }) else { return [] }
            return b.dropFirst(i + 1).prefix(count).map(\.1)
        }
    }
}

/// Tiny long-mode guest programs that drive the TPM's TIS at 0xFED40000.
public enum TPMGuestPrograms {
    /// Prints 'S', reads STS `baselineReads` times (no command), prints 'A'; sends `command`,
    /// prints 'G', tpmGo, counts STS reads until dataAvail, prints 'D' and the count (4 bytes LE),
    /// then resets through 0xCF9.
    public static func latency(command: [UInt8], baselineReads: UInt32) -> [UInt8] {
        var code: [UInt8] = [0xBB, 0x00, 0x00, 0xD4, 0xFE, 0xC6, 0x03, 0x02]   // rbx = TIS; request locality 0
        code += [0x66, 0xBA, 0xF8, 0x03, 0xB0, 0x53, 0xEE]                      // dx = COM1; out 'S'
        code += [0xB9] + (0..<4).map { UInt8(truncatingIfNeeded: baselineReads >> (8 * $0)) } // mov ecx, N
        code += [0x8B, 0x43, 0x18, 0xFF, 0xC9, 0x75, 0xF9]                      // 1: mov eax,[rbx+0x18]; dec ecx; jnz 1b
        code += [0xB0, 0x41, 0xEE]                                              // out 'A'
        code += [0xC7, 0x43, 0x18, 0x40, 0, 0, 0]                               // commandReady
        for b in command { code += [0xC6, 0x43, 0x24, b] }                      // the command into the FIFO
        code += [0xB0, 0x47, 0xEE]                                              // out 'G'
        code += [0xC7, 0x43, 0x18, 0x20, 0, 0, 0]                               // tpmGo
        code += [0x31, 0xC9, 0xFF, 0xC1, 0x8B, 0x43, 0x18, 0xA8, 0x10, 0x74, 0xF7] // ecx = 0; 2: inc ecx; STS; dataAvail? no: 2b
        code += [0xB0, 0x44, 0xEE, 0x89, 0xC8]                                  // out 'D'; mov eax, ecx
        for _ in 0..<4 { code += [0xEE, 0xC1, 0xE8, 0x08] }                     // out al; shr eax, 8
        code += [0x66, 0xBA, 0xF9, 0x0C, 0xB0, 0x0F, 0xEE]                      // reset through 0xCF9
        return code
    }
}

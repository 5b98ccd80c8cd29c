import Devices
import VMMCore

extension Fuzz {
    /// `fuzz-table-loader`: decodes `data` as a script and runs it against 64 KiB of guest RAM with three
    /// small files (`a`, `b` and `w`) and a bump allocator. Commands must name those files to get past
    /// the first one. It must never trap.
    public static func tableLoader(_ data: [UInt8]) {
        guard let cmds = try? TableLoader.decode(data),
              let memory = try? GuestMemory(ranges: [(GuestAddress(0), 64 << 10)]) else { return }
        let files: [String: [UInt8]] = [
            "a": (0..<100).map { UInt8(truncatingIfNeeded: $0) },
            "b": [UInt8](repeating: 0, count: 40),
            "w": [UInt8](repeating: 0, count: 8),
        ]
        var next: UInt64 = 0x1000
        var contents = files
        _ = try? TableLoaderExecutor.run(
            cmds,
            files: { files[$0] },
            allocate: { _, size, alignment, _ in
                // The executor checked that `alignment` is a power of two. Wrapping arithmetic: an address
                // past the end of RAM makes the copy fail, which is what this allocator wants.
                let mask = UInt64(alignment) - 1
                let address = (next &+ mask) & ~mask
                next = address &+ UInt64(size)
                return address
            },
            memory: memory,
            // The executor checked that the bytes lie inside the file.
            writeFile: { file, offset, bytes in contents[file]?.replaceSubrange(offset..<offset + bytes.count, with: bytes) })
    }
}

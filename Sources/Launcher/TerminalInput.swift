import Devices
import Glibc
import VMMSys

/// Forwards standard input to the guest's console (the serial port, or the virtio console). A terminal is switched to raw mode (keeping
/// Ctrl-C as SIGINT, which stops the VM) and restored on exit; a pipe is forwarded as it comes;
/// /dev/null or a closed stdin forwards nothing.
final class TerminalInput: @unchecked Sendable {
    private var saved = termios()
    private let isTerminal: Bool
    private var thread: OSThread?

    /// `enqueue` takes what fits of the bytes and returns how many it took.
    init(enqueue: @escaping @Sendable (ArraySlice<UInt8>) -> Int) {
        isTerminal = isatty(0) == 1
        if isTerminal, tcgetattr(0, &saved) == 0 {
            var raw = saved
            cfmakeraw(&raw)
            raw.c_lflag |= tcflag_t(ISIG)          // Ctrl-C still stops the VMM
            raw.c_oflag |= tcflag_t(OPOST | ONLCR) // keep our own messages readable
            tcsetattr(0, TCSANOW, &raw)
        }
        thread = try? OSThread(name: "stdin", role: .io) {
            var buffer = [UInt8](repeating: 0, count: 256)
            while true {
                let n = readSome(fd: 0, into: &buffer)
                if n <= 0 { return }
                var pending = buffer[0..<n]
                // Wait for room rather than drop what a pipe delivers faster than the guest reads.
                while !pending.isEmpty {
                    let taken = enqueue(pending)
                    pending = pending.dropFirst(taken)
                    if !pending.isEmpty { usleep(10_000) }
                }
            }
        }
    }

    func restore() {
        if isTerminal { tcsetattr(0, TCSANOW, &saved) }
    }
}

import Devices
import VMMCore

extension Fuzz {
    // `fuzz-device-state`: snapshot payloads fed to each device model's `restoreSnapshot`.

    struct NoLine: InterruptLine { func setLevel(_ high: Bool) {} }
    struct NoConsole: ConsoleOutput { func write(_ bytes: UnsafeRawBufferPointer) {} }

    /// Every snapshot device, configured as a small machine would configure it (fixed clocks).
    static func snapshotDevices(memory: GuestMemory) -> [() -> any SnapshotDevice] {
        [
            { Serial16550(output: NoConsole(), irq: NoLine()) },
            { I8042(irq: NoLine()) {} },
            { CMOSClock(now: { 1_700_000_000 }) },
            { ACPIPowerManagement(gpeBlockLength: 4, sci: NoLine(), now: { 5_000_000_000 }, onPowerOff: {}, onReset: {}) },
            {
                let fw = FwCfg(memory: memory)
                fw.addItem(key: 0x0005, data: [2, 0])
                try? fw.addFile("etc/table", data: (0..<300).map { UInt8(truncatingIfNeeded: $0) })
                try? fw.addWritableFile("etc/vmgenid_addr", size: 8) { _, _, _ in }
                try? fw.addWritableFile("etc/vmcoreinfo", size: 16) { _, _, _ in }
                return fw
            },
            { VMGenID(guid: [UInt8](repeating: 0x11, count: 16), memory: memory) {} },
        ]
    }

    /// Byte 0 picks the device (modulo 6), byte 1 the payload version (modulo 4), the rest is the
    /// payload. Checks, by trapping, that a rejected payload leaves the device as it was; that a
    /// loaded one saves to bytes that a fresh device loads and saves identically; and that a
    /// current-version payload that loads saves back to itself (except fw_cfg, whose files may come in
    /// any order). Must never trap otherwise.
    public static func deviceState(_ data: [UInt8]) {
        guard data.count >= 2, let memory = try? GuestMemory(ranges: [(GuestAddress(0), 1 << 16)]) else { return }
        let makers = snapshotDevices(memory: memory)
        let make = makers[Int(data[0]) % makers.count]
        let version = UInt16(data[1] % 4)
        let payload = Array(data[2...])
        let device = make()
        let pristine = device.saveSnapshot()
        do {
            try device.restoreSnapshot(payload, version: version)
        } catch {
            precondition(device.saveSnapshot() == pristine, "a rejected payload changed the device (\(error))")
            return
        }
        let saved = device.saveSnapshot()
        let kind = type(of: device)
        if version == kind.snapshotVersion && !(device is FwCfg) {
            precondition(saved == payload, "a current-version payload did not save back to itself")
        }
        let other = make()
        do {
            try other.restoreSnapshot(saved, version: kind.snapshotVersion)
        } catch {
            preconditionFailure("a saved payload does not load: \(error)")
        }
        precondition(other.saveSnapshot() == saved, "save → restore → save changed the bytes")
    }
}

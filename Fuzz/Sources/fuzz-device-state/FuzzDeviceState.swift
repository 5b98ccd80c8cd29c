import Devices

/// libFuzzer entry: snapshot payloads fed to each device model's `restoreSnapshot` (byte 0 picks the
/// device, byte 1 the payload version; see `SnapshotFuzz.restoreOne`). Any trap is a bug: a crash,
/// a rejected payload that changed the device, or a loaded one that does not save and load back.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzDeviceState(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    SnapshotFuzz.restoreOne(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}

import FuzzEntries

/// libFuzzer entry: `Fuzz.qmpCommands` (Sources/FuzzEntries in the main package) on the input. Any trap is a bug.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    Fuzz.qmpCommands(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}

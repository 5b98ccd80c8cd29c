import Devices

/// libFuzzer entry: arbitrary bytes as an etc/table-loader script, decoded and executed against a
/// tiny guest memory (see `tableLoaderFuzz`). Any trap is a bug.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzTableLoader(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    tableLoaderFuzz(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}

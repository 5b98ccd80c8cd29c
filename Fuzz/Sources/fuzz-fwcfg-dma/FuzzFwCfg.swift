import Devices

/// libFuzzer entry: guest selector writes, DMA descriptors and DMA starts against a small fw_cfg
/// with guest memory (see `FwCfg.fuzzOne`). Any trap is a bug.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzFwCfg(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    FwCfg.fuzzOne(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}

import KVM
import WireFormat

/// libFuzzer entry: arbitrary bytes as a snapshot's `vcpu.N` or `vm` payload (the first byte picks
/// which, and the layout version). Decoding must either succeed or throw an `LEDecodeError` naming
/// the field; a decoded state must encode to bytes that decode to the same state.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzKVMState(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size > 0 else { return 0 }
    let selector = data[0]
    let bytes = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    let version = UInt16(selector >> 1 & 3) // 0 (refused), 1 (current), 2 and 3 (newer: trailing bytes ignored)
    var r = LEReader(bytes)
    if selector & 1 == 0 {
        guard let state = try? VCPUState(from: &r, version: version) else { return 0 }
        var w = LEWriter()
        state.encode(to: &w)
        var again = LEReader(w.bytes)
        precondition((try? VCPUState(from: &again, version: VCPUState.version)) == state, "vCPU state does not round-trip")
    } else {
        guard let state = try? VMState(from: &r, version: version) else { return 0 }
        var w = LEWriter()
        state.encode(to: &w)
        var again = LEReader(w.bytes)
        precondition((try? VMState(from: &again, version: VMState.version)) == state, "VM state does not round-trip")
    }
    return 0
}

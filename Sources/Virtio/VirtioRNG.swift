import VMMCore

/// Where random bytes come from (the host's getrandom in the machine; a fixed pattern in tests).
public protocol EntropySource: Sendable {
    /// Fills `buffer` with random bytes.
    func fill(_ buffer: UnsafeMutableRawBufferPointer)
}

/// virtio-rng (device ID 4): one queue of device-writable buffers, each filled with host entropy.
/// At most `maxPerRequest` bytes go into one chain, so a guest asking for gigabytes gets them in
/// pieces and the serving thread stays responsive.
public final class VirtioRNG: VirtioDeviceModel {
    public let deviceType: UInt32 = 4
    public let kind = "rng"
    public let features: UInt64 = VirtioFeature.indirectDescriptors | VirtioFeature.eventIndex
    public let queueSizes: [UInt16] = [256]
    public static let maxPerRequest = 64 << 10
    let source: any EntropySource

    public init(source: any EntropySource) { self.source = source }

    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {}

    public func serve(queue: Int, chain: DescriptorChain, memory: GuestMemory) -> UInt32 {
        var total = 0
        for s in chain.writable where total < Self.maxPerRequest {
            let n = min(Int(s.length), Self.maxPerRequest - total)
            guard let p = try? memory.hostPointer(s.address, length: UInt64(n)) else { break }
            // SAFETY: hostPointer validated n bytes of guest RAM at p.
            source.fill(UnsafeMutableRawBufferPointer(start: p, count: n))
            total += n
        }
        return UInt32(total)
    }
}

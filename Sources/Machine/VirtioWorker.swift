import KVM
import Logging
import VMMSys
import Virtio

/// A virtio device the machine is given: the model's host side comes from the launcher.
public enum VirtioDeviceSpec: Sendable {
    /// virtio-blk over `store`, with the ID GET_ID reports.
    case block(store: any BlockStore, id: String)
    /// virtio-rng from the host's getrandom.
    case rng
    /// virtio-console: the guest's hvc0 on the machine's console, fed from the host's input.
    case console
    /// virtio-net over `backend` (a tap), with its MAC address.
    case net(backend: any NetBackend, mac: [UInt8])

    public var kind: String {
        switch self {
        case .block: return "blk"
        case .rng: return "rng"
        case .console: return "con"
        case .net: return "net"
        }
    }
}

/// The host's getrandom(2), for virtio-rng.
struct HostEntropy: EntropySource {
    func fill(_ buffer: UnsafeMutableRawBufferPointer) { fillRandom(buffer) }
}

/// The machine's side of one virtio device: the eventfd KVM signals when the guest writes the
/// device's QueueNotify register (an ioeventfd: no exit to userspace), the eventfd that raises its
/// interrupt (an irqfd), and the thread that serves its queues. vCPU threads never do the device's
/// I/O: a kick only signals the eventfd.
///
/// For a snapshot the thread is held between two chains (`hold`), so every request it took is
/// complete and in the used ring when the device's state is saved.
final class VirtioWorker: @unchecked Sendable {
    let kick: EventFD
    let irq: EventFD
    private let control: EventFD
    private let lock = ConditionLock()
    private var stopping = false
    private var holdRequested = false
    private var held = false
    private var thread: OSThread?
    /// Set once the transport exists (it needs this worker's eventfds first).
    private(set) var device: VirtioMMIO?
    let logger: Logger

    init(logger: Logger) throws(SysError) {
        kick = try EventFD()
        irq = try EventFD()
        control = try EventFD()
        self.logger = logger
    }

    /// The transport's connections: its interrupt signals the irqfd, a QueueNotify that reached
    /// userspace signals the kick eventfd.
    var wiring: VirtioMMIO.Wiring {
        VirtioMMIO.Wiring(interrupt: { [irq = self.irq.signaller] in irq.signal() },
                          notify: { [kick = self.kick.signaller] _ in kick.signal() },
                          log: { [logger] in logger.warning("\($0)") })
    }

    func attach(_ device: VirtioMMIO) { self.device = device }

    /// Registers the eventfds with KVM: QueueNotify writes and the device's GSI.
    func connect(to vm: VirtualMachine) throws(KVMError) {
        guard let device else { return }
        try vm.addIOEventFD(kick, mmio: device.placement.base + VirtioMMIO.queueNotifyOffset, length: 4)
        try vm.addIRQFD(irq, gsi: device.placement.gsi)
    }

    func start() throws(SysError) {
        guard let device else { return }
        thread = try OSThread(name: device.name, role: .io) { [self] in loop(device) }
    }

    private func loop(_ device: VirtioMMIO) {
        let queues = device.model.queueSizes.indices
        // A network device is also woken by its host side (a frame on the tap), unless a frame
        // already waits for a receive buffer: then only the guest's kick (new buffers) matters.
        let net = device.model as? VirtioNet
        var watchHost = true
        while true {
            // Held (a snapshot) or stopping: only the control eventfd matters then.
            let proceed = lock.locked { () -> Bool in
                if holdRequested && !stopping {
                    held = true
                    lock.broadcast()
                    while holdRequested && !stopping { lock.wait() }
                    held = false
                }
                return !stopping
            }
            guard proceed else { return }
            var fds = [kick.fd.rawValue, control.fd.rawValue]
            // Not before the driver runs the device either: a frame already on the tap would make
            // every poll return at once (the guest's kick when it posts receive buffers wakes us).
            if let net, watchHost, net.backend.isUsable, device.isRunning { fds.append(net.backend.readinessDescriptor) }
            guard let ready = try? waitReadable(fds) else { continue }
            if ready.contains(1) { control.consume() }
            var work = ready.contains(2)
            if ready.contains(0) {
                kick.consume()
                work = true
                watchHost = true
            }
            if work {
                // Serve until every queue is drained, checking for a hold between budgets.
                var more = true
                while more && !lock.locked({ holdRequested || stopping }) {
                    more = false
                    for q in queues where device.serve(queue: q) { more = true }
                }
                // A hold that interrupted a drain: serve the rest after it (a kick is not lost).
                if more { kick.signal() }
            }
            if let net { watchHost = !net.holdsFrame }
        }
    }

    /// Holds the thread between two chains and waits until it is (at most `timeoutMilliseconds`);
    /// false when it did not stop in time (a request stuck in host I/O).
    func hold(timeoutMilliseconds: Int) -> Bool {
        guard thread != nil else { return true }
        lock.locked { holdRequested = true }
        control.signal()
        let deadline = monotonicNanoseconds() &+ UInt64(timeoutMilliseconds) * 1_000_000
        return lock.locked {
            while !held && !stopping {
                guard monotonicNanoseconds() < deadline else { return false }
                lock.wait(milliseconds: 50)
            }
            return true
        }
    }

    func release() {
        lock.locked {
            holdRequested = false
            lock.broadcast()
        }
    }

    func stop() {
        lock.locked {
            stopping = true
            lock.broadcast()
        }
        control.signal()
        thread?.join()
    }
}

import ArgumentParser
import Glibc
import Logging
import Devices
import Machine
import Snapshot

/// `swiftvmm restore DIR`: a VM from a snapshot, continued where it was saved.
struct Restore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Continue a VM from a snapshot directory (made by QMP snapshot-create).",
        discussion: """
        Guest memory is the snapshot's memory.bin mapped copy-on-write: it is read as the guest \
        touches it and never written, so several restores of one snapshot run side by side as \
        independent clones. By default the clone gets a new VM generation ID and the guest is \
        notified as soon as it runs (Linux then reseeds its random number generator). The console, \
        standard input and the exit status work as for `run`.
        """)

    @Argument(help: ArgumentHelp("The snapshot directory.", valueName: "DIR"))
    var directory: String

    @Option(help: ArgumentHelp(
        "The VM generation ID of the restored VM: a GUID, 'auto' for a new random one (default), or 'keep' for the one saved (no notification).",
        valueName: "GUID|auto|keep"))
    var vmgenid: String = "auto"

    @Flag(help: "Restore with the vCPUs paused (QMP `cont` starts them).")
    var paused = false

    @OptionGroup var vm: VMOptions

    func validate() throws {
        guard ["auto", "keep"].contains(vmgenid) || VMGenID.parseGUID(vmgenid) != nil else {
            throw ValidationError("--vmgenid must be a GUID like 12345678-9abc-def0-1234-56789abcdef0, auto or keep")
        }
    }

    func run() throws {
        bootstrapLogging(vm.logLevel)
        addInheritedDescriptors(vm.addFD)
        let host = HostVirtualization.probe(kvmPath: vm.kvmDevice)
        let monitor = Monitor.started(path: vm.qmp)
        if case .none(let reason) = host {
            fail("KVM is not available: \(reason). Without KVM, run guests in the nested test host: guest-tests/run-guest.sh (see README).")
        }
        let generationID: RestoreOptions.GenerationID
        switch vmgenid {
        case "auto": generationID = .new(VMGenID.randomGUID())
        case "keep": generationID = .keep
        default: generationID = .new(VMGenID.parseGUID(vmgenid)!)
        }
        var options = RestoreOptions(console: stdoutConsole(), generationID: generationID)
        options.kvmPath = vm.kvmDevice
        options.handleSignals = true
        options.processStart = processStart
        let machine: Machine
        do { machine = try Machine.restore(from: directory, options: options) } catch {
            fail("cannot restore \(directory): \(error)")
        }
        if case .emulated(let reason) = host {
            warnEmulated(reason: reason, allow: vm.allowSlowKVM)
        }
        if paused { machine.pause() }
        monitor.attach(machine)
        monitor.runToEnd(machine)
    }
}

import ArgumentParser
import Launcher

/// `swiftvmm restore DIR`: a VM from a snapshot, continued where it was saved.
struct Restore: LaunchingCommand {
    static let configuration = CommandConfiguration(
        _superCommandName: fastParseSuperCommand,
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

    @Option(help: ArgumentHelp(
        "The guest's clocks: 'saved' continues them from the instant of the save (default; the time the snapshot spent on disk does not pass for the guest), 'host' moves them forward by that time, so that the guest's wall clock reads the host's.",
        valueName: "saved|host"))
    var clock: String = "saved"

    @Flag(name: .customLong("no-working-set"), help: "Neither prefetch the working set kept beside the snapshot (workingset.bin) nor record one.")
    var noWorkingSet = false

    @OptionGroup var vm: VMOptions

    var config: RestoreConfig {
        var c = RestoreConfig(directory: directory)
        c.vmGenerationID = vmgenid
        c.paused = paused
        c.clock = clock
        c.workingSet = !noWorkingSet
        c.process = vm.config
        return c
    }

    func validate() throws { try usageError(config.validate) }

    func launch(_ launcher: Launcher) -> Int32 { launcher.restore(config) }
}

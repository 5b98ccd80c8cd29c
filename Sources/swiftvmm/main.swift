import Glibc
import VMMSys

// The only exit of the process: everything below returns its status.
let processStart = monotonicNanoseconds()
exit(SwiftVMM.main(arguments: Array(CommandLine.arguments.dropFirst()), processStart: processStart))

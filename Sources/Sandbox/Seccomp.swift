import CSeccomp
import Glibc
import VMMSys

/// How `--seccomp` treats the threads' filters.
public enum SeccompMode: String, Sendable, CaseIterable {
    /// Each thread is filtered; a forbidden call stops the process with a line naming it.
    case on
    /// No filter (for debugging).
    case off
    /// Filters that only make the kernel log a forbidden call (audit, `dmesg`), which then runs.
    case log
}

/// Why a filter could not be loaded.
public struct SeccompError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Loads `SeccompPolicy`'s filters: on each OSThread as it starts (through `ThreadSandbox`) and
/// on the main thread when it enters its run loop.
public enum Seccomp {
    /// The rules of `role` with system call numbers (an unknown name is a bug in the policy).
    static func compiled(_ role: ThreadRole, pid: Int32) throws(SeccompError) -> [cseccomp_rule] {
        var out: [cseccomp_rule] = []
        for rule in SeccompPolicy.rules(for: role, pid: pid) {
            let nr = cseccomp_resolve(rule.name)
            guard nr >= 0 else { throw SeccompError("seccomp: no system call named \(rule.name) on this architecture") }
            out.append(cseccomp_rule(nr: nr, arg: Int32(rule.argument?.index ?? -1), mask: rule.argument?.mask ?? 0,
                                     value: rule.argument?.value ?? 0, error: rule.error ?? 0))
        }
        return out
    }

    /// Checks every role's rules resolve and installs the SIGSYS handler; then every thread that
    /// enters a role loads its filter. A filter that fails to load ends the process with one line:
    /// a VM must not run half-sandboxed.
    public static func enable(_ mode: SeccompMode) throws(SeccompError) {
        guard mode != .off else { return }
        let pid = getpid()
        var tables: [ThreadRole: [cseccomp_rule]] = [:]
        for role in ThreadRole.allCases { tables[role] = try compiled(role, pid: pid) }
        let rc = cseccomp_install_handler()
        guard rc == 0 else { throw SeccompError("seccomp: cannot install the SIGSYS handler: \(SysError("sigaction", errno: -rc))") }
        let frozen = tables
        ThreadSandbox.setInstaller { role, name in
            let rules = frozen[role] ?? []
            let rc = rules.withUnsafeBufferPointer {
                cseccomp_load($0.baseAddress, Int32($0.count), mode == .log ? 1 : 0, role.rawValue, name)
            }
            if rc != 0 {
                let line = "swiftvmm: error: cannot load the seccomp filter of thread \(name) (\(role.rawValue) role): \(SysError("seccomp_load", errno: -rc))\n"
                exitProcess(writing: line, status: 1)
            }
        }
    }
}

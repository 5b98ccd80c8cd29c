import Glibc

/// The process's resource limits that swiftvmm tightens once a VM is set up: no core files by
/// default (a core file would hold guest memory), and no descriptors beyond what it holds plus a
/// margin.
public enum ResourceLimits {
    /// RLIMIT_CORE to 0, soft and hard: no core file, and nothing in the process can raise it again.
    public static func disableCoreDumps() throws(SysError) {
        var none = rlimit(rlim_cur: 0, rlim_max: 0)
        guard setrlimit(__rlimit_resource_t(RLIMIT_CORE.rawValue), &none) == 0 else { throw SysError.last("setrlimit RLIMIT_CORE") }
    }

    /// RLIMIT_NOFILE (soft, hard).
    public static var openFiles: (soft: UInt64, hard: UInt64) {
        var now = rlimit()
        getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &now)
        return (UInt64(now.rlim_cur), UInt64(now.rlim_max))
    }

    /// Sets RLIMIT_NOFILE to `limit`, soft and hard (a descriptor number must be below it); never
    /// raises either.
    public static func limitOpenFiles(to limit: UInt64) throws(SysError) {
        let now = openFiles
        var new = rlimit(rlim_cur: rlim_t(min(limit, now.soft)), rlim_max: rlim_t(min(limit, now.hard)))
        guard setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &new) == 0 else { throw SysError.last("setrlimit RLIMIT_NOFILE \(limit)") }
    }

    /// The highest descriptor number open in the process (from /proc/self/fd), or -1.
    public static func highestOpenDescriptor() -> Int32 {
        guard let dir = try? OwnedFD.openDirectory("/proc/self/fd") else { return -1 }
        return dir.directoryEntries().compactMap { Int32($0) }.max() ?? -1
    }
}

/// The local time zone read once: with TZ unset, glibc's `localtime` stats /etc/localtime on every
/// call (a log line's timestamp, from any thread, under a filter that allows no path lookups);
/// TZ=":/etc/localtime" names the same zone, which glibc then loads once. Call before threads start.
public func pinLocalTimeZone() {
    if getenv("TZ") == nil { setenv("TZ", ":/etc/localtime", 0) }
    tzset()
    var now = time(nil)
    var parts = tm()
    _ = localtime_r(&now, &parts)
}

import Glibc

/// The host's physical RAM in bytes, or nil if the C library cannot tell.
public func hostPhysicalMemory() -> UInt64? {
    let pages = sysconf(Int32(_SC_PHYS_PAGES)), pageSize = sysconf(Int32(_SC_PAGESIZE))
    guard pages > 0, pageSize > 0 else { return nil }
    let (total, overflow) = UInt64(pages).multipliedReportingOverflow(by: UInt64(pageSize))
    return overflow ? UInt64.max : total
}

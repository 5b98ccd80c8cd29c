import Glibc

/// `clock`'s time in nanoseconds (0 for a time before the clock's epoch).
private func nanoseconds(_ clock: clockid_t) -> UInt64 {
    var ts = timespec()
    clock_gettime(clock, &ts)
    guard ts.tv_sec >= 0 else { return 0 }
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// CLOCK_MONOTONIC in nanoseconds.
public func monotonicNanoseconds() -> UInt64 { nanoseconds(CLOCK_MONOTONIC) }

/// CLOCK_MONOTONIC in milliseconds.
public func monotonicMilliseconds() -> Int64 {
    Int64(monotonicNanoseconds() / 1_000_000)
}

/// CLOCK_REALTIME in nanoseconds since the epoch (0 before 1970).
public func realtimeNanoseconds() -> UInt64 { nanoseconds(CLOCK_REALTIME) }

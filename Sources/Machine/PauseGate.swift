import Glibc
import Synchronization

/// Parks vCPU threads while the machine is paused (QMP `stop`) and tells the pauser when all of
/// them are parked. The running path costs one atomic load per exit.
final class PauseGate: @unchecked Sendable {
    private let pausedFlag = Atomic<Bool>(false)
    private let lock = ConditionLock()
    private var paused = false
    private var released = false
    private var parked = 0

    var isPaused: Bool { pausedFlag.load(ordering: .acquiring) }

    private func locked<R>(_ body: () -> R) -> R { lock.locked(body) }

    /// Called by a vCPU thread that saw `isPaused`: waits until resumed or released.
    func park() {
        locked {
            guard paused, !released else { return }
            parked += 1
            lock.broadcast()
            while paused && !released { lock.wait() }
            parked -= 1
        }
    }

    func setPaused() {
        locked {
            paused = true
            pausedFlag.store(true, ordering: .releasing)
        }
    }

    /// Waits until `count` vCPU threads are parked, or `kick` returns false (the machine ended);
    /// `kick` runs about every 50 ms while waiting (to re-kick vCPUs still in KVM_RUN).
    func waitForParked(_ count: Int, kick: () -> Bool) {
        while true {
            let done = locked { () -> Bool in
                if parked >= count || released { return true }
                lock.wait(milliseconds: 50)
                return parked >= count || released
            }
            if done || !kick() { return }
        }
    }

    func resume() {
        locked {
            paused = false
            pausedFlag.store(false, ordering: .releasing)
            lock.broadcast()
        }
    }

    /// The machine is ending: wake every parked thread for good.
    func release() {
        locked {
            released = true
            lock.broadcast()
        }
    }
}

/// A one-shot gate the vCPU threads wait at before their first KVM_RUN, opened once `run()` has
/// registered all of them: a `pause()` that comes while they are being started (a QMP command sent
/// as the machine starts) then either sees every thread and waits for each to park, or sees none,
/// and then none has entered the guest (each checks the pause flag when the latch opens).
final class StartLatch: @unchecked Sendable {
    private let lock = ConditionLock()
    private var open = false

    func wait() { lock.locked { while !open { lock.wait() } } }

    func release() {
        lock.locked {
            open = true
            lock.broadcast()
        }
    }
}

/// A pthread mutex with its condition variable. `wait` and `broadcast` are called inside `locked`.
final class ConditionLock: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var cond = pthread_cond_t()

    init() {
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&cond, nil)
    }

    deinit {
        pthread_cond_destroy(&cond)
        pthread_mutex_destroy(&mutex)
    }

    func locked<R>(_ body: () -> R) -> R {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return body()
    }

    func wait() { pthread_cond_wait(&cond, &mutex) }

    /// Waits for a broadcast or until `milliseconds` have passed.
    func wait(milliseconds: Int) {
        var deadline = timespec()
        clock_gettime(CLOCK_REALTIME, &deadline)
        deadline.tv_nsec += milliseconds * 1_000_000
        deadline.tv_sec += deadline.tv_nsec / 1_000_000_000
        deadline.tv_nsec %= 1_000_000_000
        _ = pthread_cond_timedwait(&cond, &mutex, &deadline)
    }

    func broadcast() { pthread_cond_broadcast(&cond) }
}

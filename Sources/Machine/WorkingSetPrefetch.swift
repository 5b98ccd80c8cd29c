import Snapshot
import VMMSys

/// A restored guest's working set (`WorkingSet`, beside its snapshot): the first restore of a
/// snapshot records the pages its guest touched in its first second of running (or until it ended, if
/// sooner); later restores bring those
/// pages into the process's page tables on a background thread while the vCPUs start, so that the
/// guest's first accesses do not each fault them in from the file.
extension Machine {
    /// How long the first restore watches its guest before it records the working set.
    static let workingSetWindowMilliseconds: Int32 = 1000

    /// For a restored machine (`enabled` unless `--no-working-set`): when its snapshot has a working
    /// set, starts prefetching it at once, on its own thread, so that it overlaps the rest of the
    /// restore (vCPU and device state) as well as the guest's start; when it has none, notes that
    /// `run()` is to record one. Called once memory is mapped; `run()` joins the thread.
    func startWorkingSet(enabled: Bool) {
        guard let snapshot = restoredFrom, enabled else { return }
        let runs: [WorkingSet.Run]
        do {
            guard let loaded = try WorkingSet.load(directory: snapshot.directory, memoryLength: snapshot.header.memoryFileLength) else {
                recordsWorkingSet = true
                return
            }
            runs = loaded
        } catch {
            logger.notice("the snapshot's working set is not used: \(error)")
            return
        }
        do {
            let thread = try OSThread(name: "prefetch", role: .io) { [self] in prefetch(runs) }
            workingSetThread.withLock { $0 = thread }
        } catch {
            logger.notice("no prefetch thread: \(error)")
        }
    }

    /// Stops and joins the prefetch thread of a machine whose restore failed (it will never run).
    func abandonPrefetch() {
        lifecycle.finish(.failed("the restore failed"))
        workingSetThread.withLock { $0 }?.join()
    }

    /// For a restored machine whose snapshot had no working set (`startWorkingSet`): starts the
    /// thread that records one (nil when there is nothing to do). Called when the vCPUs start.
    func startWorkingSetRecorder() -> OSThread? {
        guard recordsWorkingSet, let snapshot = restoredFrom else { return nil }
        let length = snapshot.header.memoryFileLength, directory = snapshot.directory
        do {
            return try OSThread(name: "workingset", role: .qmp) { [self] in recordWorkingSet(directory: directory, memoryLength: length) }
        } catch {
            logger.notice("no working-set thread: \(error)")
            return nil
        }
    }

    /// The host address ranges of file pages [first, first + count), split at RAM region ends.
    private func hostRanges(firstPage: UInt64, pages: UInt64) -> [(UnsafeMutableRawPointer, Int)] {
        var result: [(UnsafeMutableRawPointer, Int)] = []
        var start = firstPage * WorkingSet.pageSize
        let end = (firstPage + pages) * WorkingSet.pageSize
        var regionStart: UInt64 = 0
        for region in memory.regions {
            let regionEnd = regionStart + region.size
            if start < regionEnd && end > regionStart {
                let from = max(start, regionStart), to = min(end, regionEnd)
                result.append((region.hostBase + Int(from - regionStart), Int(to - from)))
                start = to
            }
            regionStart = regionEnd
            if start >= end { break }
        }
        return result
    }

    private func prefetch(_ runs: [WorkingSet.Run]) {
        let clock = ContinuousClock()
        let began = clock.now
        var bytes = 0
        let piece = 2 << 20
        for run in runs {
            for (base, length) in hostRanges(firstPage: run.firstPage, pages: UInt64(run.pages)) {
                var offset = 0
                while offset < length {
                    if lifecycle.hasEnded { return }
                    let n = min(piece, length - offset)
                    let error = prefetchMapping(base + offset, length: n)
                    if error != 0 {
                        logger.notice("prefetching the working set stopped: errno \(error)")
                        return
                    }
                    offset += n
                    bytes += n
                }
            }
        }
        logger.info("prefetched the snapshot's working set, \(bytes >> 10) KiB in \(runs.count) runs, in \(clock.now - began)")
    }

    private func recordWorkingSet(directory: String, memoryLength: UInt64) {
        // The guest's first second of running (time paused, e.g. `restore --paused` or `stop`,
        // does not count), or what it touched until the machine ended if that came first; a
        // guest that ran less than a tenth of that leaves nothing worth recording.
        let step: Int32 = 50
        var ran: Int32 = 0
        while ran < Self.workingSetWindowMilliseconds {
            let ended = (try? waitReadable([lifecycle.event.fd.rawValue], timeoutMilliseconds: step))?.isEmpty == false
            if ended || lifecycle.hasEnded { break }
            if !isPaused { ran += step }
        }
        guard ran >= Self.workingSetWindowMilliseconds / 10 else {
            logger.info("the guest ran \(ran) ms: no working set recorded")
            return
        }
        var present: [Bool] = []
        present.reserveCapacity(Int(memoryLength / WorkingSet.pageSize))
        for region in memory.regions {
            let pages = Int(region.size / WorkingSet.pageSize)
            guard let entries = pagemapEntries(base: region.hostBase, pages: pages) else { return }
            // In the page tables (the guest read or wrote it) or swapped out after a write.
            present.append(contentsOf: entries.map { $0 >> 63 & 1 == 1 || $0 >> 62 & 1 == 1 })
        }
        let runs = WorkingSet.runs(present)
        let pages = runs.reduce(0) { $0 + Int($1.pages) }
        do {
            if try WorkingSet.store(runs, directory: directory, memoryLength: memoryLength) {
                logger.info("recorded the guest's working set, \(pages * 4) KiB in \(runs.count) runs, in \(directory)/\(WorkingSet.fileName)")
            }
        } catch {
            logger.info("the guest's working set is not recorded: \(error)")
        }
    }
}

//! How the trainer uses the CPU it is given: the allocator, and how many threads train.
//!
//! **Memory.** A training step allocates and frees hundreds of tensors of a few hundred
//! KB to a few MB. glibc's defaults hand such blocks back to the kernel as soon as they
//! are freed (`mmap` above a threshold, `brk` trimming below), so every step faults the
//! same pages in again and the kernel zeroes them: on the tiny preset a third of a step
//! went to page faults, zeroing and `brk` (4.0k → 6.1k tokens/s on one thread once
//! freed memory stays in the heap).
//!
//! **Threads.** candle parallelises inside each operation: gemm on rayon's pool,
//! elementwise ops on a pool of its own that spins while it waits. On the tiny preset's
//! small tensors the two pools fight over the cores and two threads trained *slower*
//! than one. So candle's operations run on one thread (candle reads `RAYON_NUM_THREADS`
//! on every matmul and when it starts its pool), and the trainer parallelises across
//! rows instead: each of [`threads`] threads takes a slice of the batch through the whole
//! forward and backward pass ([`crate::model::InnerOptimizer::gradients`]), which keeps
//! every core on large, independent work.

use std::sync::OnceLock;

static THREADS: OnceLock<usize> = OnceLock::new();

/// Training threads of this process: what [`init`] chose, or 1 where it was not called
/// (library use and tests: results stay those of one sequential pass).
pub fn threads() -> usize {
    THREADS.get().copied().unwrap_or(1)
}

/// Sets the allocator and the threads up. The thread count is `STARLING_THREADS`,
/// otherwise `RAYON_NUM_THREADS`, otherwise the CPUs this process may use (its affinity
/// mask and cgroup quota: the pod's CPU limit). The binary's `main` calls it once it has
/// parsed its arguments and before anything else, while it is the only thread: it writes
/// the process environment. Returns the thread count.
pub fn init() -> usize {
    keep_freed_memory();
    let threads = thread_count(
        std::env::var(crate::env::THREADS).ok().as_deref(),
        std::env::var("RAYON_NUM_THREADS").ok().as_deref(),
        std::thread::available_parallelism().map_or(1, usize::from),
    );
    // SAFETY: main calls init first, before tracing, tokio or rayon start a thread, so
    // no other thread can read the environment while it is written. The thread count
    // goes into the environment too, for child processes to inherit rather than the 1
    // meant for candle.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        std::env::set_var(crate::env::THREADS, threads.to_string());
    }
    // rayon's own pool (the codec, the row slices) keeps every thread.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    *THREADS.get_or_init(|| threads)
}

/// The first positive count of `starling` and `rayon` (environment values), else
/// `available`.
fn thread_count(starling: Option<&str>, rayon: Option<&str>, available: usize) -> usize {
    [starling, rayon]
        .into_iter()
        .flatten()
        .find_map(|v| v.trim().parse::<usize>().ok().filter(|&n| n > 0))
        .unwrap_or(available)
        .max(1)
}

/// Keeps freed memory in the process for the next step: blocks up to 32 MiB (glibc's
/// ceiling for the mmap threshold) come from the heap, and the heap is trimmed only when
/// more than 1 GiB of it is free. The peak resident size is what it would be anyway; it
/// is held between steps instead of being returned and faulted in again.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt only sets allocator parameters; it is thread-safe and takes
        // plain integers. A refused value (0 returned) leaves glibc's default in place.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// Has every thread allocate from one of two heaps. glibc gives threads that allocate at
/// once heaps of their own (up to eight per core), each keeping what was freed in it:
/// the exchange's gRPC threads each take in and send out whole updates, so a dense run's
/// exchange held a third more memory than with one heap (`bench convergence`, a 9.5M
/// parameter model with 4 peers: 1242 MiB at its peak, 865 MiB with one heap). Call it
/// first thing, before any thread starts (before [`init`], whose pool starts threads
/// that allocate): once threads have made more than eight heaps, glibc no longer
/// lowers its limit. For roles that serve rather than train.
pub fn few_heaps() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: as in `keep_freed_memory`.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// The peak resident memory (`VmHWM`, Linux) of process `pid`, or of this process.
pub fn peak_rss_bytes(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::thread_count;

    #[test]
    fn the_thread_count_is_starlings_then_rayons_then_the_cpus_given() {
        assert_eq!(thread_count(Some("3"), Some("2"), 8), 3);
        assert_eq!(thread_count(None, Some("2"), 8), 2);
        assert_eq!(thread_count(None, None, 8), 8);
        // Unparsable or zero values are passed over, not taken as one thread.
        assert_eq!(thread_count(Some("lots"), Some("0"), 4), 4);
        assert_eq!(thread_count(Some(" 2 "), None, 4), 2);
        assert_eq!(thread_count(None, None, 0), 1);
    }
}

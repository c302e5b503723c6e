//! Handing freed heap back to the system after a full sync, whichever allocator the
//! binary uses (the `kproxy` binary uses mimalloc; tests and benches use glibc's), and
//! measuring this process's memory. Safe Rust: the allocator calls are in `sys::heap`.
#![deny(unsafe_code)]

/// Returns free memory to the system. A full sync builds the whole transaction (and the
/// watchers' initial lists arrive at once); without this the steady-state footprint
/// would be that peak rather than the compact model.
pub fn release_free_memory() {
    crate::sys::heap::release_free();
}

/// This process's resident memory now and at its peak (KiB), from /proc/self/status;
/// `None` where that file is not readable.
pub fn usage_kib() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Logs (at debug level) the resident memory after a phase of a one-shot command, so
/// `-v=4` shows where a command's peak comes from.
pub fn log_phase(phase: &str) {
    // Called on the daemon's sync path too: read /proc only when the line is wanted.
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    if let Some((rss, hwm)) = usage_kib() {
        tracing::debug!(phase, rss_mib = rss / 1024, peak_mib = hwm / 1024, "memory");
    }
}

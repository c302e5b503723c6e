//! Best-effort sysctls (route_localnet for localhost NodePorts): written only when they
//! differ, and a read-only /proc/sys is a warning, not a failure.

use std::path::Path;

/// Sets `/proc/sys/<key>` to `value` if it differs; returns whether it wrote.
pub fn ensure(key: &str, value: &str) -> std::io::Result<bool> {
    let path = Path::new("/proc/sys").join(key);
    let current = std::fs::read_to_string(&path)?;
    if current.trim() == value {
        return Ok(false);
    }
    std::fs::write(&path, value)?;
    Ok(true)
}

/// Like [`ensure`], logging instead of failing.
pub fn ensure_or_warn(key: &str, value: &str) {
    match ensure(key, value) {
        Ok(true) => tracing::info!(sysctl = key, value, "set sysctl"),
        Ok(false) => {}
        Err(e) => tracing::warn!(sysctl = key, value, error = %e, "could not set sysctl"),
    }
}

/// Reads a sysctl as an integer (None when absent or unreadable).
pub fn read_int(key: &str) -> Option<i64> {
    std::fs::read_to_string(Path::new("/proc/sys").join(key))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

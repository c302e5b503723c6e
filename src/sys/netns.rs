//! Network namespaces for the calling thread (unshare/setns). Both move only the
//! calling thread, so callers run them on a thread of their own.

use std::os::fd::AsRawFd;

/// Moves the calling thread into a new, empty network namespace.
pub(crate) fn unshare_net() -> std::io::Result<()> {
    // SAFETY: unshare(2) with a constant flag affects only this thread's namespaces;
    // no memory is passed.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into the network namespace `ns` refers to.
pub(crate) fn enter_net(ns: &impl AsRawFd) -> std::io::Result<()> {
    // SAFETY: setns(2) on this thread only, with a descriptor the caller keeps open for
    // the duration of the call.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

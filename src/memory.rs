//! Handing freed heap back to the system after a full sync, whichever allocator the
//! binary uses (the `kproxy` binary uses mimalloc; tests and benches use glibc's).

/// Returns free memory to the system. A full sync builds the whole transaction (and the
/// watchers' initial lists arrive at once); without this the steady-state footprint
/// would be that peak rather than the compact model.
pub fn release_free_memory() {
    // SAFETY: both calls only release memory that is already free; no live
    // allocation moves.
    unsafe {
        libmimalloc_sys::mi_collect(true);
        libc::malloc_trim(0);
    }
}

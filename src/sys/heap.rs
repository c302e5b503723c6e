//! Giving free heap memory back to the system (both allocators a kproxy build may
//! use: mimalloc in the binary, glibc's in tests and benches).

/// Returns free memory to the system.
pub(crate) fn release_free() {
    // SAFETY: both calls only release memory that is already free; no live
    // allocation moves, and neither takes pointers from us.
    unsafe {
        libmimalloc_sys::mi_collect(true);
        libc::malloc_trim(0);
    }
}

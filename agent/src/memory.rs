//! The agent's heap, kept close to what it holds.
//!
//! glibc's malloc gives every thread that allocates an arena of its own (up
//! to 8 per core), and keeps freed memory in them. The agent's big
//! allocations come in bursts on whichever tokio worker runs them: the
//! first lists decode every Service and EndpointSlice of the cluster, and a
//! full pass computes every Service's desired entries at once. Once those
//! are in the stores and the maps the memory is free, but without these
//! two steps it stays in the process (riptide-dns does the same).

/// Caps glibc at one malloc arena. Call before any thread starts: the
/// agent's allocations after start-up are small and rare (one Service's
/// change at a time), so one arena costs no contention worth measuring.
pub fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: called before other threads exist; M_ARENA_MAX only bounds
    // how many arenas later allocations may create.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hands free heap pages back to the kernel. After a full pass (the first
/// sync, a relist): the decoded lists and the pass's working set are freed
/// by then.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

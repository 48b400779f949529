//! The agent's memory, kept close to what it holds.
//!
//! glibc's malloc gives every thread that allocates an arena of its own (up
//! to 8 per core), and keeps freed memory in them. The agent's big
//! allocations come in bursts on whichever tokio worker runs them: the
//! first lists decode every Service and EndpointSlice of the cluster, and a
//! full pass computes every Service's desired entries at once. Once those
//! are in the stores and the maps the memory is free, but without these
//! two steps it stays in the process (riptide-dns does the same). Large
//! blocks (list buffers, growing hash tables) get pages of their own, so
//! freeing them returns those pages rather than leaving holes in the heap.

/// Caps glibc at one malloc arena. Call before any thread starts: the
/// agent's allocations after start-up are small and rare (one Service's
/// change at a time), so one arena costs no contention worth measuring.
///
/// Also fixes the size from which an allocation gets pages of its own
/// (`mmap`) at [`MMAP_THRESHOLD`]. glibc raises that threshold to the size
/// of each such block freed (up to 32 MiB), so after the first list page
/// the lists' buffers, the decoded pages and the stores' hash tables while
/// they grow all come from the heap; freed, they leave holes between the
/// objects the stores keep, which the heap cannot return.
pub fn configure_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: called before other threads exist; M_ARENA_MAX only bounds
    // how many arenas later allocations may create, M_MMAP_THRESHOLD only
    // where later large blocks come from.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Blocks of at least this many bytes are mapped on their own and unmapped
/// when freed (glibc's initial threshold, kept fixed).
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

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

/// Drops this process's copies of the pages that hold only `bytes`: data
/// read once at start (the embedded eBPF object, parsed while the datapath
/// loads) would otherwise stay resident for good. Partial pages at either
/// end are kept; a later read faults the pages back in from the file.
///
/// # Safety
///
/// `bytes` must lie in a read-only mapping of the executable file that was
/// never written (constant data such as `include_bytes!`, which the linker
/// places in `.rodata`): for such pages `MADV_DONTNEED` only forgets clean
/// copies of the file, whereas written or anonymous pages would read back
/// as zeros.
pub unsafe fn release_file_pages(bytes: &'static [u8]) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let begin = bytes.as_ptr() as usize;
        let start = begin.div_ceil(page) * page;
        let end = (begin + bytes.len()) / page * page;
        if end > start {
            // SAFETY: whole pages inside `bytes`, clean file pages by the
            // caller's guarantee; nothing holds a reference that could
            // observe the difference (reads fault them back in unchanged).
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Constant data in `.rodata`, several pages long.
    static DATA: [u8; 5 * 4096 + 123] = {
        let mut d = [0u8; 5 * 4096 + 123];
        let mut i = 0;
        while i < d.len() {
            d[i] = (i % 251) as u8;
            i += 1;
        }
        d
    };

    #[test]
    fn released_read_only_pages_read_back_unchanged() {
        let sum = |d: &[u8]| d.iter().map(|b| u64::from(*b)).sum::<u64>();
        let before = sum(std::hint::black_box(&DATA));
        // SAFETY: `DATA` is constant data, never written.
        unsafe { super::release_file_pages(&DATA) };
        assert_eq!(sum(std::hint::black_box(&DATA)), before);
        assert!(DATA.iter().enumerate().all(|(i, b)| usize::from(*b) == i % 251));
    }
}

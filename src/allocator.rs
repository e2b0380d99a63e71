//! The process's heap: glibc malloc's settings, fixed before any other thread exists.
//!
//! Left to itself, glibc moves its mmap threshold as blocks are freed and trims the heap
//! of each thread's arena as soon as its free top passes twice that threshold. The
//! inspection path frees and reallocates the same few buffers of 0.1–5 MB per batch on the
//! daemon's inference thread (tiles, maps, ONNX Runtime's outputs), so depending on the
//! order of early allocations a daemon either reuses them or returns them to the kernel and
//! faults them back in on every batch: measured on dev-epyc at 32 k to 1.9 M page faults in
//! 30 s of the same 640×480 replay, and about 20 % slower inspections in the runs with
//! millions (docs/performance.md, "The daemon's heap"). With the thresholds fixed the heap
//! keeps what it had: 9–17 k faults in 30 s. A global allocator crate would not reach ONNX
//! Runtime's own allocations, which go through the same malloc.

/// Blocks up to this size come from the arenas, never from a fresh mmap.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of a heap kept before any is returned to the kernel.
const TRIM_THRESHOLD: i32 = 256 << 20;
/// Extra memory a growing heap takes at once.
const TOP_PAD: i32 = 64 << 20;

/// Fixes malloc's thresholds (a no-op where the C library is not glibc). `main` calls it
/// first, while it is the only thread.
#[allow(unsafe_code)]
pub fn keep_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (parameter, value) in
        [(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD), (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD), (libc::M_TOP_PAD, TOP_PAD)]
    {
        // SAFETY: mallopt only changes malloc's parameters; called before other threads
        // exist, it races with no allocation. It returns 0 for a value it refuses.
        let accepted = unsafe { libc::mallopt(parameter, value) };
        debug_assert_eq!(accepted, 1, "mallopt({parameter}, {value})");
    }
}

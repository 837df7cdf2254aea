//! The global allocator: mimalloc, entered through its plain `malloc` when
//! the alignment asked for is one it gives anyway.
//!
//! The `mimalloc` crate's `GlobalAlloc` sends every allocation through
//! `mi_malloc_aligned`. In mimalloc v3 that call takes a fast path only for
//! blocks up to 1 KiB whose free-list head happens to be aligned; anything
//! else (a spawned task, a hyper read buffer, a large future) goes through
//! the generic aligned path and often over-allocates. The request path makes
//! several such allocations per request. `mi_malloc` already returns blocks
//! aligned to 16 bytes (8 for blocks under 16), so, like Rust's own `System`
//! allocator, this one calls the aligned entry points only for alignments
//! beyond that. Measured with `bench/proxy-instructions.sh`: see
//! bench/RESULTS.md, session 8.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// The alignment every `mi_malloc` block of at least this size has
/// (`MI_MAX_ALIGN_SIZE`).
const MIN_ALIGN: usize = 16;

/// mimalloc as the global allocator (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocator;

/// Whether a plain (unaligned) mimalloc call satisfies `align` for a block
/// of `size` bytes.
#[inline]
fn plain_suffices(size: usize, align: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it through
// `mi_free` / `mi_realloc*`, which accept blocks from any of its entry
// points; a plain call is used only where its documented alignment meets the
// layout's.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain FFI calls; `layout` has a non-zero size and a
        // power-of-two alignment, as GlobalAlloc's contract guarantees.
        unsafe {
            if plain_suffices(layout.size(), layout.align()) {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if plain_suffices(layout.size(), layout.align()) {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` was returned by this allocator (caller's contract).
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was returned by this allocator with `layout`, and
        // `new_size` is non-zero (caller's contract).
        unsafe {
            if plain_suffices(new_size, layout.align()) {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size/alignment combination comes back aligned, survives a
    /// grow and a shrink with its contents, and is zeroed when asked.
    #[test]
    fn blocks_are_aligned_and_keep_their_contents() {
        let a = Allocator;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 7, 8, 15, 16, 24, 100, 1000, 1536, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).expect("valid layout");
                // SAFETY: non-zero sizes, valid layouts, blocks freed with
                // the layout they were allocated with.
                unsafe {
                    let p = a.alloc_zeroed(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    assert!((0..size).all(|i| *p.add(i) == 0), "zeroed: {size}/{align}");
                    for i in 0..size {
                        *p.add(i) = (i % 251) as u8;
                    }
                    let bigger = size * 3 + 5;
                    let q = a.realloc(p, layout, bigger);
                    assert_eq!(q as usize % align, 0, "grown {size} align {align}");
                    assert!((0..size).all(|i| *q.add(i) == (i % 251) as u8));
                    let grown = Layout::from_size_align(bigger, align).expect("valid layout");
                    let r = a.realloc(q, grown, size.div_ceil(2));
                    assert_eq!(r as usize % align, 0, "shrunk {size} align {align}");
                    assert!((0..size.div_ceil(2)).all(|i| *r.add(i) == (i % 251) as u8));
                    let shrunk =
                        Layout::from_size_align(size.div_ceil(2), align).expect("valid layout");
                    a.dealloc(r, shrunk);

                    let p = a.alloc(layout);
                    assert_eq!(p as usize % align, 0);
                    a.dealloc(p, layout);
                }
            }
        }
    }
}

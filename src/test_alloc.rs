//! The lib's unit tests run on this allocator: it counts each thread's own
//! heap bytes (allocated minus freed there), so a test can measure what a
//! structure it built holds while other tests run on other threads.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static NET_BYTES: Cell<isize> = const { Cell::new(0) };
}

/// Heap bytes this thread allocated and has not freed.
pub(crate) fn net_bytes() -> isize {
    NET_BYTES.with(Cell::get)
}

fn count(bytes: isize) {
    // `try_with`: an allocation during the thread's teardown goes uncounted.
    let _ = NET_BYTES.try_with(|n| n.set(n.get() + bytes));
}

struct PerThread;

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for PerThread {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static PER_THREAD: PerThread = PerThread;

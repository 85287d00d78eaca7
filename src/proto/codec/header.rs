//! Fixed header and variable byte integers (§2.1, §1.5.5).

/// The largest Remaining Length four varint bytes can carry.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

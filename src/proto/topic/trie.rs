//! (topic helper)

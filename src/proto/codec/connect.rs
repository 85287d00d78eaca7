//! (codec helper)

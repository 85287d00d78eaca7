//! (keepalive helper)

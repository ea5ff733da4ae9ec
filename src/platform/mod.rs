//! The few calls that exist only on Apple platforms, kept in one place so the
//! surface that Linux CI never compiles is small and easy to review.

#[cfg(target_vendor = "apple")]
pub mod apple;

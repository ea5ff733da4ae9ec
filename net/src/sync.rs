//! The one way tensorlink takes a std mutex.

use std::sync::{Mutex, MutexGuard};

/// Locks `m` even if a thread panicked while holding it: every critical
/// section in tensorlink leaves its data whole (maps of pending requests,
/// caches, link states), so one failed request must not wedge the others.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

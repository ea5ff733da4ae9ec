//! Logging: `tracing` everywhere, one reverse-DNS subsystem with a category per
//! module. On Apple platforms events also go to the unified log, so Console.app
//! and `log stream --predicate 'subsystem == "dev.tensorlink"'` show them; stderr
//! is always written too, which launchd keeps in the agent's log file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The unified log subsystem of every tensorlink process.
pub const SUBSYSTEM: &str = "dev.tensorlink";
/// The environment variable holding the log filter (`info`, `tensorlink::peers=debug`, …).
pub const LOG_ENV: &str = "TENSORLINK_LOG";
/// Unified-log categories: the modules whose events users filter by.
pub const CATEGORIES: &[&str] = &[
    "node", "server", "peers", "net", "protocol", "api", "topology",
];

/// The category of an event target such as `tensorlink::peers::link`.
pub fn category(target: &str) -> &'static str {
    let module = target
        .strip_prefix("tensorlink::")
        .and_then(|rest| rest.split("::").next())
        .unwrap_or("");
    CATEGORIES
        .iter()
        .copied()
        .find(|c| *c == module)
        .unwrap_or("node")
}

/// Installs the global subscriber. Level from `TENSORLINK_LOG`, default `info`.
pub fn init() {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter).with(stderr);
    #[cfg(target_vendor = "apple")]
    let registry = registry.with(apple::unified_log_layers());
    registry.init();
}

#[cfg(target_vendor = "apple")]
mod apple {
    //! Never compiled on Linux CI; written against tracing-oslog 0.3's documented API.
    use tracing_oslog::OsLogger;
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::Layer;

    /// One os_log handle per category, each taking only its module's events.
    pub fn unified_log_layers<S>() -> Vec<Box<dyn Layer<S> + Send + Sync>>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        super::CATEGORIES
            .iter()
            .map(|&cat| {
                OsLogger::new(super::SUBSYSTEM, cat)
                    .with_filter(filter_fn(move |meta| super::category(meta.target()) == cat))
                    .boxed()
            })
            .collect()
    }
}

/// Lets one log line through per interval and counts the rest, so a flood of
/// hostile connections cannot flood the log.
pub struct Throttle {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were
    /// suppressed since the last one.
    pub fn allow(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.interval) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_follow_modules() {
        assert_eq!(category("tensorlink::peers::link"), "peers");
        assert_eq!(category("tensorlink::net"), "net");
        assert_eq!(category("tensorlink_node"), "node");
        assert_eq!(category("hyper::proto"), "node");
    }

    #[test]
    fn throttle_counts_what_it_suppresses() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        *t.last.lock().unwrap() = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(t.allow(), Some(2));
    }
}

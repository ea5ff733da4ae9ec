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
    "node",
    "server",
    "peers",
    "net",
    "protocol",
    "api",
    "topology",
    "inference",
    "power",
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
    let registry = registry.with(apple::UnifiedLog::new());
    registry.init();
}

#[cfg(target_vendor = "apple")]
mod apple {
    //! Compiled only for Apple targets (scripts/check-apple type-checks it).
    //!
    //! One layer routes every event to its category's os_log handle. Not one
    //! `OsLogger` per category behind per-layer filters: tracing-oslog 0.3.0's
    //! `on_event` looks up the current span through its own filtered context and
    //! `expect`s it, so an event inside a span another category's filter had
    //! excluded panics (src/logger.rs, `on_event`); and each logger's
    //! `on_close` `expect`s to remove the span's activity, which only the first
    //! logger to close finds. Here span bookkeeping is done once, by one logger,
    //! and every logger sees every span, since nothing filters per layer.
    use tracing::span::{Attributes, Id};
    use tracing::{Event, Subscriber};
    use tracing_oslog::OsLogger;
    use tracing_subscriber::layer::Context;
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    pub struct UnifiedLog {
        /// One handle per entry of `CATEGORIES`, in that order.
        loggers: Vec<OsLogger>,
    }

    impl UnifiedLog {
        pub fn new() -> Self {
            UnifiedLog {
                loggers: super::CATEGORIES
                    .iter()
                    .map(|&cat| OsLogger::new(super::SUBSYSTEM, cat))
                    .collect(),
            }
        }

        fn for_target(&self, target: &str) -> &OsLogger {
            let cat = super::category(target);
            let i = super::CATEGORIES
                .iter()
                .position(|c| *c == cat)
                .unwrap_or(0);
            &self.loggers[i]
        }
    }

    impl<S> Layer<S> for UnifiedLog
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
            // Any logger records the span's activity; all loggers share it.
            self.loggers[0].on_new_span(attrs, id, ctx);
        }

        fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
            self.for_target(event.metadata().target())
                .on_event(event, ctx);
        }

        fn on_close(&self, id: Id, ctx: Context<'_, S>) {
            self.loggers[0].on_close(id, ctx);
        }
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
        let mut last = crate::net::sync::lock(&self.last);
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
        assert_eq!(category("tensorlink::inference::runtime"), "inference");
        assert_eq!(category("tensorlink::power"), "power");
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

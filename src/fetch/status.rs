//! How a model fetch stands, as `/cluster`, the web UI and the log show it.

use std::time::{Duration, Instant};

use serde::Serialize;

/// One fetch's state, replaced as it moves on.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FetchStatus {
    /// Where the model will be.
    pub file: String,
    /// `waiting` (no linked peer has it yet), `checking` (hashing a partial
    /// file left by an earlier attempt), `fetching`, `loading`, `done`, or
    /// `failed` (for good: the fetched file does not load).
    pub state: &'static str,
    /// The peer the bytes come from.
    pub from: Option<String>,
    pub bytes: u64,
    pub total: Option<u64>,
    /// Over this attempt, in bytes per second.
    pub rate: Option<f64>,
    pub eta_seconds: Option<u64>,
    /// Why the last attempt stopped, while the next one waits.
    pub error: Option<String>,
}

impl FetchStatus {
    pub fn waiting(file: String, error: Option<String>) -> Self {
        FetchStatus {
            file,
            state: "waiting",
            from: None,
            bytes: 0,
            total: None,
            rate: None,
            eta_seconds: None,
            error,
        }
    }

    /// One sentence for a person: the web UI's banner and `/cluster`'s problem.
    pub fn describe(&self) -> String {
        let from = self.from.as_deref().unwrap_or("a peer");
        let done = match self.total {
            Some(total) if total > 0 => format!(
                "{:.0}% ({} of {})",
                self.bytes as f64 * 100.0 / total as f64,
                size(self.bytes),
                size(total)
            ),
            _ => size(self.bytes),
        };
        let rate = self
            .rate
            .map(|r| format!(", {:.0} MB/s", r / 1e6))
            .unwrap_or_default();
        let eta = self
            .eta_seconds
            .map(|s| format!(", about {} left", duration(s)))
            .unwrap_or_default();
        let error = self
            .error
            .as_deref()
            .map(|e| format!(" (last attempt: {e})"))
            .unwrap_or_default();
        match self.state {
            "waiting" => format!(
                "the model {} is missing: waiting for a linked peer that runs it{error}",
                self.file
            ),
            "checking" => format!(
                "checking the {done} of {} fetched before, to resume",
                self.file
            ),
            "fetching" => format!(
                "fetching the model {} from {from}: {done}{rate}{eta}",
                self.file
            ),
            "loading" => format!("loading the model {}, fetched from {from}", self.file),
            "done" => format!("fetched the model {} from {from}", self.file),
            _ => format!("the fetched model {} does not load{error}", self.file),
        }
    }
}

/// A rate over an attempt and the time left at that rate.
pub struct Meter {
    start: Instant,
    start_bytes: u64,
}

impl Meter {
    pub fn new(start_bytes: u64) -> Self {
        Meter {
            start: Instant::now(),
            start_bytes,
        }
    }

    /// Where the meter started: the bytes that were there before.
    pub fn start_bytes(&self) -> u64 {
        self.start_bytes
    }

    /// Bytes per second since the meter started, and the seconds left to
    /// `total` at that rate once it has run long enough to mean something.
    pub fn read(&self, bytes: u64, total: u64) -> (Option<f64>, Option<u64>) {
        let elapsed = self.start.elapsed();
        if elapsed.is_zero() || bytes <= self.start_bytes {
            return (None, None);
        }
        let rate = (bytes - self.start_bytes) as f64 / elapsed.as_secs_f64();
        if elapsed < Duration::from_millis(200) {
            return (Some(rate), None);
        }
        let left = total.saturating_sub(bytes) as f64 / rate;
        (Some(rate), Some(left.ceil() as u64))
    }
}

/// A size as people read it: MiB, or GiB from one on.
pub fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn duration(seconds: u64) -> String {
    match seconds {
        0..=90 => format!("{seconds} s"),
        91..=5400 => format!("{} min", seconds.div_ceil(60)),
        _ => format!("{:.1} h", seconds as f64 / 3600.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_reads_as_a_sentence() {
        let status = FetchStatus {
            state: "fetching",
            from: Some("mac1".into()),
            bytes: 3 << 30,
            total: Some(12 << 30),
            rate: Some(850e6),
            eta_seconds: Some(11 * 60 + 20),
            ..FetchStatus::waiting("/m/Llama.gguf".into(), None)
        };
        assert_eq!(
            status.describe(),
            "fetching the model /m/Llama.gguf from mac1: 25% (3.0 GiB of 12.0 GiB), 850 MB/s, about 12 min left"
        );
        let waiting = FetchStatus::waiting("/m/x.gguf".into(), Some("mac1: link lost".into()));
        assert_eq!(
            waiting.describe(),
            "the model /m/x.gguf is missing: waiting for a linked peer that runs it (last attempt: mac1: link lost)"
        );
    }
}

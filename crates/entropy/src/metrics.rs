//! Counters for Prometheus, written out by hand in the text exposition format: a handful
//! of atomics do not justify a metrics framework.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::source::SourceStatus;

/// Why a request was refused; the `reason` label of `dqkd_entropy_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// 400: malformed request or length out of bounds.
    BadRequest,
    /// 403: caller not allowed (wrong role, not a reader).
    Forbidden,
    /// 404: unknown or expired range, or unknown route.
    NotFound,
    /// 405: wrong method.
    MethodNotAllowed,
    /// 410: the caller already read the range.
    AlreadyRead,
    /// 413: request body too large.
    TooLarge,
    /// 503: the memory bound is reached.
    PoolFull,
    /// 503: the entropy source or the server failed.
    Internal,
    /// 503: the calling KME's quota is reached.
    Quota,
    /// 503: the entropy source failed a health test or ran out (latched).
    SourceFailed,
}

impl Refusal {
    const ALL: [Refusal; 10] = [
        Refusal::BadRequest,
        Refusal::Forbidden,
        Refusal::NotFound,
        Refusal::MethodNotAllowed,
        Refusal::AlreadyRead,
        Refusal::TooLarge,
        Refusal::PoolFull,
        Refusal::Internal,
        Refusal::Quota,
        Refusal::SourceFailed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::Forbidden => "forbidden",
            Refusal::NotFound => "not_found",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::AlreadyRead => "already_read",
            Refusal::TooLarge => "too_large",
            Refusal::PoolFull => "pool_full",
            Refusal::Internal => "internal",
            Refusal::Quota => "quota_exceeded",
            Refusal::SourceFailed => "source_failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The server's counters. All monotonic except the live-bytes gauge, which is read from
/// the pools when rendering.
#[derive(Debug, Default)]
pub struct Metrics {
    bytes_allocated: AtomicU64,
    bytes_served: AtomicU64,
    bytes_shredded: AtomicU64,
    allocations: AtomicU64,
    refusals: [AtomicU64; Refusal::ALL.len()],
}

impl Metrics {
    /// One allocation of `len` bytes was handed out.
    pub fn allocated(&self, len: u64) {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.bytes_allocated.fetch_add(len, Ordering::Relaxed);
    }

    /// A reader was served `len` bytes.
    pub fn served(&self, len: u64) {
        self.bytes_served.fetch_add(len, Ordering::Relaxed);
    }

    /// `len` held bytes were released for shredding.
    pub fn shredded(&self, len: u64) {
        if len > 0 {
            self.bytes_shredded.fetch_add(len, Ordering::Relaxed);
        }
    }

    /// A request was refused.
    pub fn refused(&self, reason: Refusal) {
        self.refusals[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every counter, with `live_bytes` and the health of
    /// each raw entropy source as gauges.
    pub fn render(&self, live_bytes: u64, sources: SourceStatus) -> String {
        let mut out = String::with_capacity(1024);
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {value}");
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            "dqkd_entropy_bytes_allocated_total",
            "Random bytes handed out to allocating KMEs.",
            get(&self.bytes_allocated),
        );
        counter(
            "dqkd_entropy_bytes_served_total",
            "Range bytes served to reading KMEs.",
            get(&self.bytes_served),
        );
        counter(
            "dqkd_entropy_bytes_shredded_total",
            "Held range bytes released for zeroisation (all readers done or pool expired).",
            get(&self.bytes_shredded),
        );
        counter(
            "dqkd_entropy_allocations_total",
            "Ranges allocated.",
            get(&self.allocations),
        );
        let _ = writeln!(
            out,
            "# HELP dqkd_entropy_live_bytes Unread range bytes held in memory."
        );
        let _ = writeln!(out, "# TYPE dqkd_entropy_live_bytes gauge");
        let _ = writeln!(out, "dqkd_entropy_live_bytes {live_bytes}");
        let _ = writeln!(
            out,
            "# HELP dqkd_entropy_source_healthy 1 while the raw source passes its SP 800-90B \
             health tests (and a mix file is not exhausted), 0 once it failed (until restart)."
        );
        let _ = writeln!(out, "# TYPE dqkd_entropy_source_healthy gauge");
        let mut healthy = |source: &str, ok: bool| {
            let _ = writeln!(
                out,
                "dqkd_entropy_source_healthy{{source=\"{source}\"}} {}",
                u8::from(ok)
            );
        };
        healthy("os", sources.os_healthy);
        if let Some(ok) = sources.mix_healthy {
            healthy("mix", ok);
        }
        let _ = writeln!(
            out,
            "# HELP dqkd_entropy_refusals_total Requests refused, by reason."
        );
        let _ = writeln!(out, "# TYPE dqkd_entropy_refusals_total counter");
        for reason in Refusal::ALL {
            let _ = writeln!(
                out,
                "dqkd_entropy_refusals_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                get(&self.refusals[reason.index()])
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::default();
        m.allocated(10);
        m.served(10);
        m.shredded(10);
        m.refused(Refusal::PoolFull);
        m.refused(Refusal::PoolFull);
        let text = m.render(
            5,
            SourceStatus {
                os_healthy: true,
                mix_healthy: Some(false),
            },
        );
        assert!(text.contains("dqkd_entropy_source_healthy{source=\"os\"} 1\n"));
        assert!(text.contains("dqkd_entropy_source_healthy{source=\"mix\"} 0\n"));
        assert!(text.contains("dqkd_entropy_bytes_allocated_total 10\n"));
        assert!(text.contains("dqkd_entropy_allocations_total 1\n"));
        assert!(text.contains("dqkd_entropy_live_bytes 5\n"));
        assert!(text.contains("dqkd_entropy_refusals_total{reason=\"pool_full\"} 2\n"));
        assert!(text.contains("dqkd_entropy_refusals_total{reason=\"forbidden\"} 0\n"));
    }
}

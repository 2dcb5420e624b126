//! The `postcopy` object of the statistics: what the post-copy phase did (pages faulted,
//! streamed and dropped, fault latencies, time to the last page, the guest's rate meanwhile).

use serde::{Deserialize, Serialize};

/// Fault latency percentiles, ms: a guest fault to its page placed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyMs {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Longest.
    pub max: f64,
}

impl LatencyMs {
    /// Percentiles of `ns` (any order; empty: all zero).
    pub fn of_ns(ns: &mut [u64]) -> LatencyMs {
        if ns.is_empty() {
            return LatencyMs::default();
        }
        ns.sort_unstable();
        let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1e6;
        LatencyMs {
            p50: at(0.5),
            p99: at(0.99),
            max: ns[ns.len() - 1] as f64 / 1e6,
        }
    }
}

/// The post-copy phase, from the guest's resume on the destination to its last page.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PostcopyStats {
    /// `now` or `auto`.
    pub mode: String,
    /// Pages owed when the guest paused (neither sent nor current at the destination).
    pub pages_owed: u64,
    /// Owed pages placed because the guest faulted on them (requested from the source).
    pub pages_faulted: u64,
    /// Owed pages placed from the background stream before the guest touched them.
    pub pages_streamed: u64,
    /// Owed pages placed as they came on the requested pages' own connection
    /// (`--postcopy-preempt`; destination).
    pub pages_preempted: u64,
    /// Pages that arrived after they were placed, dropped (destination).
    pub pages_dropped: u64,
    /// Pages refused because their check failed: never placed, asked for again
    /// (destination).
    pub pages_refused: u64,
    /// Source: requests served on the priority path.
    pub requests_served: u64,
    /// Fault to placement.
    pub fault_latency_ms: LatencyMs,
    /// From the guest's resume to the last owed page placed, ms.
    pub resume_to_last_page_ms: f64,
    /// Guest transactions per second from the resume to the last page.
    pub tps_during: Option<f64>,
    /// `match` or `mismatch`: the digest of the memory as the pages landed against the
    /// source's at the pause.
    pub digest: String,
    /// Times the link was re-established during post-copy.
    pub reconnects: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_sorted_latencies() {
        let mut ns: Vec<u64> = (1..=100).rev().map(|i| i * 1_000_000).collect();
        let l = LatencyMs::of_ns(&mut ns);
        assert_eq!((l.p50, l.p99, l.max), (51.0, 99.0, 100.0));
        assert_eq!(LatencyMs::of_ns(&mut []), LatencyMs::default());
    }

    /// The `postcopy` object's key paths (`POSTCOPY.md`, *Statistics*); scripts read them.
    #[test]
    fn postcopy_json_keeps_its_keys() {
        let json = serde_json::to_value(PostcopyStats::default()).unwrap();
        let mut keys: Vec<String> = Vec::new();
        for (k, v) in json.as_object().unwrap() {
            match v.as_object() {
                Some(o) => keys.extend(o.keys().map(|c| format!("{k}.{c}"))),
                None => keys.push(k.clone()),
            }
        }
        keys.sort();
        assert_eq!(
            keys,
            [
                "digest",
                "fault_latency_ms.max",
                "fault_latency_ms.p50",
                "fault_latency_ms.p99",
                "mode",
                "pages_dropped",
                "pages_faulted",
                "pages_owed",
                "pages_preempted",
                "pages_refused",
                "pages_streamed",
                "reconnects",
                "requests_served",
                "resume_to_last_page_ms",
                "tps_during",
            ]
        );
    }
}

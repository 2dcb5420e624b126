//! How the migration proved the destination's memory (`--verify`): the mode used, what the
//! scrubber covered, the tracking errors it found, and the post-commit audit's verdict.

use serde::{Deserialize, Serialize};

/// The `verify` object of the statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VerificationStats {
    /// `--verify` as given: `auto`, `full`, `incremental` or `strict`.
    pub requested: String,
    /// The mode used (`auto` resolved): `full`, `incremental` or `strict`.
    pub mode: String,
    /// Source, incremental modes: the share of guest pages the scrubber re-verified since
    /// they were last sent, at the pause (0 to 1).
    pub scrub_coverage: Option<f64>,
    /// Source, incremental modes: pages the scrubber read (or checked as holes), all passes.
    pub pages_scrubbed: Option<u64>,
    /// Source: writes the dirty tracker missed, found by the scrubber (and sent again).
    pub tracking_errors: u64,
    /// Their pages (at most 1024), ascending.
    pub tracking_error_pages: Vec<u64>,
    /// Both sides, incremental modes: the post-commit audit.
    pub audit: Option<AuditStats>,
}

/// The post-commit audit of the source's memory at the pause against what it sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditStats {
    /// `match`, `mismatch`, `incomplete`, or (destination) `missing` when no audit came.
    pub result: String,
    /// Pages compared.
    pub pages_checked: u64,
    /// Pages that differ: the destination holds stale copies of them.
    pub mismatched: u64,
    /// The first of them (at most 1024), ascending.
    pub pages: Vec<u64>,
    /// Source: how long the audit took, ms (after the commit: not downtime).
    pub duration_ms: Option<f64>,
}

impl VerificationStats {
    /// Whether the audit found pages the destination holds stale copies of.
    pub fn audit_mismatch(&self) -> bool {
        self.audit.as_ref().is_some_and(|a| a.mismatched > 0)
    }

    /// One line for the summary.
    pub fn summary_line(&self) -> String {
        let mut s = format!("  verify:     {}", self.mode);
        if !self.requested.is_empty() && self.requested != self.mode {
            s.push_str(&format!(" (--verify {})", self.requested));
        }
        if let Some(c) = self.scrub_coverage {
            s.push_str(&format!(", scrub coverage {:.0}%", c * 100.0));
        }
        if self.scrub_coverage.is_some() {
            s.push_str(&format!(", tracking errors {}", self.tracking_errors));
        }
        if let Some(a) = &self.audit {
            s.push_str(&format!(", audit {}", a.result));
            if a.mismatched > 0 {
                s.push_str(&format!(
                    " ({} page(s), first {:?})",
                    a.mismatched,
                    &a.pages[..a.pages.len().min(8)]
                ));
            }
        }
        s.push('\n');
        s
    }
}

//! The destination's last step after an incremental digest: reading the source's audit of
//! its memory at the pause against what it sent, and reporting it.

use crate::migration::dest::machine::{unexpected, Dest};
use crate::migration::digest::audit_stats;
use crate::migration::transport::Frame;
use crate::migration::wire::Message;
use crate::telemetry::verification::AuditStats;

impl Dest<'_> {
    /// After an incremental digest: the source's audit of its memory at the pause against
    /// what it sent. A mismatch means the guest here runs on stale copies of those pages:
    /// nothing can roll back, so it is reported (statistics, an error notice, and the CLI's
    /// exit status).
    pub(super) fn await_audit(&mut self) {
        let audit = match self.reader.read_frame() {
            Ok(Frame::Control(Message::Audit(a))) => audit_stats(&a),
            other => {
                let why = match other {
                    Ok(f) => unexpected("the audit", f).to_string(),
                    Err(e) => e.to_string(),
                };
                self.cfg
                    .notices
                    .warning(format!("no audit from the source: {why}"));
                AuditStats {
                    result: "missing".into(),
                    ..Default::default()
                }
            }
        };
        if audit.mismatched > 0 {
            self.cfg.notices.error(format!(
                "post-commit audit: the source's memory at the pause differs from what it \
                 sent in {} page(s) (first: {:?}); the committed image holds stale copies",
                audit.mismatched,
                &audit.pages[..audit.pages.len().min(8)]
            ));
        }
        if let Some(v) = &mut self.stats.verify {
            v.audit = Some(audit);
        }
    }
}

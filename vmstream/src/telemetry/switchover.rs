//! How long each phase of the switchover took, as the `switchover_ms` object of
//! `--stats-json`: one optional field per phase, left out when the side did not run it.

use serde::{Deserialize, Serialize};

/// Time of each switchover phase, ms. The source times `pause_and_collect`,
/// `final_round_and_digest`, `digest`, `await_commit` and `end_guest`; the destination `digest`,
/// `verify`, `commit`, `await_handover`, `resume` and, for a KVM guest, `kvm_restore` and
/// `kvm_first_tx`. Fields are in alphabetical order, the order the JSON and the summary
/// always had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SwitchoverTimes {
    /// Source: from the final round's acknowledgement to the commit reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub await_commit: Option<f64>,
    /// Destination: waiting for the source's `Handover` after the commit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub await_handover: Option<f64>,
    /// Destination: putting the image in place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<f64>,
    /// Hashing guest memory (both sides).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<f64>,
    /// Source: ending the guest after the commit, before the `Handover` (a QEMU guest: its
    /// QEMU's migration of the device state to the destination's QEMU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_guest: Option<f64>,
    /// Source: sending the last pages, the guest state and the digest, to their
    /// acknowledgement.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_round_and_digest: Option<f64>,
    /// Destination: from starting the KVM guest's vCPUs to its first transaction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvm_first_tx: Option<f64>,
    /// Destination: restoring the KVM guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvm_restore: Option<f64>,
    /// Source: pausing the guest and collecting its last dirty pages (with a collect in
    /// parts, the hash tracker's, queueing them for the final round as it goes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_and_collect: Option<f64>,
    /// Destination: starting the guest process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<f64>,
    /// Destination: the workload's verify of the final image (`--resume`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<f64>,
}

impl SwitchoverTimes {
    /// The phases that ran, by name, in alphabetical order.
    pub fn phases(&self) -> impl Iterator<Item = (&'static str, f64)> {
        [
            ("await_commit", self.await_commit),
            ("await_handover", self.await_handover),
            ("commit", self.commit),
            ("digest", self.digest),
            ("end_guest", self.end_guest),
            ("final_round_and_digest", self.final_round_and_digest),
            ("kvm_first_tx", self.kvm_first_tx),
            ("kvm_restore", self.kvm_restore),
            ("pause_and_collect", self.pause_and_collect),
            ("resume", self.resume),
            ("verify", self.verify),
        ]
        .into_iter()
        .filter_map(|(name, ms)| ms.map(|ms| (name, ms)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_named_as_their_json_keys() {
        let t = SwitchoverTimes {
            await_commit: Some(1.0),
            digest: Some(2.0),
            kvm_first_tx: Some(3.0),
            ..Default::default()
        };
        let json = serde_json::to_value(t).unwrap();
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        let phases: Vec<(&str, f64)> = t.phases().collect();
        assert_eq!(keys, phases.iter().map(|p| p.0).collect::<Vec<_>>());
        assert_eq!(
            phases,
            [
                ("await_commit", 1.0),
                ("digest", 2.0),
                ("kvm_first_tx", 3.0)
            ]
        );
        let all = SwitchoverTimes {
            await_commit: Some(0.0),
            await_handover: Some(0.0),
            commit: Some(0.0),
            digest: Some(0.0),
            end_guest: Some(0.0),
            final_round_and_digest: Some(0.0),
            kvm_first_tx: Some(0.0),
            kvm_restore: Some(0.0),
            pause_and_collect: Some(0.0),
            resume: Some(0.0),
            verify: Some(0.0),
        };
        let json = serde_json::to_value(all).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(keys, all.phases().map(|p| p.0).collect::<Vec<_>>());
        assert!(SwitchoverTimes::default().phases().next().is_none());
    }
}

//! The settings that shaped a migration, as the `settings` object of `--stats-json`: typed
//! fields, each written as text (scripts compare `"true"`, `"2"`, `"encode workers"`), and
//! left out when the side did not set it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::converge::Strategy;

/// Settings of either side; a field the side does not know is `None` and not written.
/// Fields are in alphabetical order: the order of the JSON since it was a sorted map.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Every connection proved the pre-shared key (`--auth-key-file`).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub authenticated: Option<bool>,
    /// The auto-converge percentages (source, `--converge qemu`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_converge: Option<String>,
    /// Parallel connections.
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// Full-page compression and its level, as the codec spells it (`Lz4 { acceleration: 1 }`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Throttling strategy (source).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub converge: Option<Strategy>,
    /// Hot-page deferral: share and segment size (source, `--defer-hot`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub defer_hot: Option<String>,
    /// Bytes hot-page deferral saved: pages written again while held back (source).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub defer_hot_saved_bytes: Option<u64>,
    /// Delta mode announced in the handshake (destination; `Xbzrle`, `Off`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<String>,
    /// The destination reported its guest running after the commit (source).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub destination_running: Option<bool>,
    /// Dirty tracker (source; `uffd-wp`, `hash`, `kvm-clear`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_tracking: Option<String>,
    /// `--downtime-limit`, ms (source).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<u128>,
    /// `--downtime-target`, ms (source).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub downtime_target_ms: Option<u128>,
    /// `file` or `kvm` (source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_kind: Option<String>,
    /// Round trip of the handshake, ms (source).
    #[serde(with = "as_text_1dp", skip_serializing_if = "Option::is_none")]
    pub handshake_round_trip_ms: Option<f64>,
    /// Size of the KVM guest's state (destination).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub kvm_state_bytes: Option<usize>,
    /// vCPUs of the KVM guest (destination).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub kvm_vcpus: Option<usize>,
    /// `--max-bandwidth` (source).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<BandwidthLimit>,
    /// The channels' migration id, hex (source, more than one channel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    /// Who copies live pages out of the guest (source).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub page_copies: Option<PageCopies>,
    /// Convergence policy's name (source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Decode workers of the destination.
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub receiver_workers: Option<usize>,
    /// Round trip to the destination, at most, after the last running round, ms (source).
    #[serde(with = "as_text_2dp", skip_serializing_if = "Option::is_none")]
    pub round_trip_ms: Option<f64>,
    /// Transactions of the source guest at the pause (destination).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub source_tx_at_pause: Option<u64>,
    /// Expected time of the memory digest at the switchover, ms (source).
    #[serde(with = "as_text_1dp", skip_serializing_if = "Option::is_none")]
    pub switchover_digest_estimate_ms: Option<f64>,
    /// Encode workers (source).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// XBZRLE deltas on (source).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub xbzrle: Option<bool>,
    /// The XBZRLE page cache of all channels, bytes (source, with XBZRLE).
    #[serde(with = "as_text", skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_bytes: Option<u64>,
}

/// Who copies the pages of the running guest for sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCopies {
    /// The encode workers, in parallel.
    EncodeWorkers,
    /// The sending thread, into the codec's batch.
    SendingThread,
}

impl fmt::Display for PageCopies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageCopies::EncodeWorkers => "encode workers",
            PageCopies::SendingThread => "sending thread",
        })
    }
}

impl FromStr for PageCopies {
    type Err = String;
    fn from_str(s: &str) -> Result<PageCopies, String> {
        match s {
            "encode workers" => Ok(PageCopies::EncodeWorkers),
            "sending thread" => Ok(PageCopies::SendingThread),
            _ => Err(format!("unknown page copier {s:?}")),
        }
    }
}

/// The emulated link speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BandwidthLimit {
    /// As fast as the link goes.
    Unlimited,
    /// At most this many bytes per second.
    BytesPerSecond(u64),
}

impl From<Option<u64>> for BandwidthLimit {
    fn from(limit: Option<u64>) -> BandwidthLimit {
        limit.map_or(BandwidthLimit::Unlimited, BandwidthLimit::BytesPerSecond)
    }
}

impl fmt::Display for BandwidthLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BandwidthLimit::Unlimited => f.write_str("unlimited"),
            BandwidthLimit::BytesPerSecond(b) => write!(f, "{b}"),
        }
    }
}

impl FromStr for BandwidthLimit {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<BandwidthLimit, Self::Err> {
        match s {
            "unlimited" => Ok(BandwidthLimit::Unlimited),
            _ => s.parse().map(BandwidthLimit::BytesPerSecond),
        }
    }
}

/// An optional value written as its `Display` text and read back with `FromStr`.
mod as_text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        Option::<String>::deserialize(d)?
            .map(|text| text.parse().map_err(de::Error::custom))
            .transpose()
    }
}

/// Milliseconds written as text with one decimal.
mod as_text_1dp {
    pub use super::as_text::deserialize;

    pub fn serialize<S: serde::Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        super::as_text::serialize(&v.map(|v| format!("{v:.1}")), s)
    }
}

/// Milliseconds written as text with two decimals.
mod as_text_2dp {
    pub use super::as_text::deserialize;

    pub fn serialize<S: serde::Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        super::as_text::serialize(&v.map(|v| format!("{v:.2}")), s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_written_as_the_text_they_always_were() {
        let s = Settings {
            authenticated: Some(false),
            channels: Some(2),
            converge: Some(Strategy::DirectStaged),
            downtime_limit_ms: Some(300),
            handshake_round_trip_ms: Some(0.26),
            max_bandwidth: Some(None.into()),
            page_copies: Some(PageCopies::EncodeWorkers),
            round_trip_ms: Some(1.0),
            switchover_digest_estimate_ms: Some(12.0),
            ..Settings::default()
        };
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "authenticated": "false",
                "channels": "2",
                "converge": "direct-staged",
                "downtime_limit_ms": "300",
                "handshake_round_trip_ms": "0.3",
                "max_bandwidth": "unlimited",
                "page_copies": "encode workers",
                "round_trip_ms": "1.00",
                "switchover_digest_estimate_ms": "12.0",
            })
        );
        let limited = Settings {
            max_bandwidth: Some(Some(125_000_000).into()),
            page_copies: Some(PageCopies::SendingThread),
            ..Settings::default()
        };
        assert_eq!(
            serde_json::to_value(&limited).unwrap(),
            serde_json::json!({"max_bandwidth": "125000000", "page_copies": "sending thread"})
        );
    }

    #[test]
    fn settings_read_back_and_missing_ones_are_none() {
        let s = Settings {
            authenticated: Some(true),
            max_bandwidth: Some(Some(7).into()),
            page_copies: Some(PageCopies::SendingThread),
            round_trip_ms: Some(1.5),
            compression: Some("None".into()),
            ..Settings::default()
        };
        let back: Settings = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        let old: Settings = serde_json::from_str(r#"{"threads":"4","unknown":"x"}"#).unwrap();
        assert_eq!(old.threads, Some(4));
        assert_eq!(old.authenticated, None);
        assert!(serde_json::from_str::<Settings>(r#"{"threads":"four"}"#).is_err());
    }
}

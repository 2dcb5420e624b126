//! What a migration measures of each disk it moved: the `disks` objects of the statistics.

use serde::{Deserialize, Serialize};

/// One migrated disk's figures (`--stats-json`'s `disks`, in `--disk` order).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskStats {
    /// The disk's path on this side.
    pub path: String,
    /// Bytes of the disk.
    pub size: u64,
    /// Dirty-tracking granule, bytes.
    pub granularity: u64,
    /// How dirty granules were found ("hash", "builtin"; source).
    pub tracking: Option<String>,
    /// Packet bytes attributed to this disk: each round's packet bytes shared among memory
    /// and the disks by their non-zero pages (source; a disk-only round's are exact).
    pub bytes_on_wire: u64,
    /// Bytes of the disk sent, all rounds (pages times 4 KiB, zero pages included).
    pub bytes_sent: u64,
    /// Bytes sent by the bulk copy (round 0 of the disk: its data, holes skipped).
    pub bulk_bytes: u64,
    /// What the guest wrote to the disk during the migration. With `hash` tracking this
    /// is the dirty data observed: pages whose content changed between two collections,
    /// times 4 KiB (a page rewritten twice between them counts once).
    pub guest_bytes_written: u64,
    /// Dirty data sent after the bulk copy divided by `guest_bytes_written` (0 when
    /// nothing was written).
    pub amplification: f64,
    /// Rounds that sent some of this disk (the bulk copy included).
    pub rounds: u64,
    /// The disk's digest at the pause (`PROTOCOL.md`, *Disks*), hex.
    pub digest: Option<String>,
    /// The disk was committed (destination) or the destination committed it (source).
    pub committed: bool,
    /// Disk write QoS (source): the tightest cap put on the guest's writes to this disk,
    /// bytes/s (`None`: never capped).
    pub write_limit_min: Option<u64>,
    /// Disk write QoS: how long a cap was in force, ms.
    pub write_limited_ms: f64,
    /// Disk write QoS: how long the guest's writes to this disk waited for the cap, ms.
    pub write_limit_wait_ms: f64,
    /// The guest's write latency during the migration, median, microseconds (builtin
    /// tracking: the block layer's histogram, 41 % buckets; the limit's and the mirror's
    /// waits included).
    pub write_latency_p50_us: Option<f64>,
    /// The same, 99th percentile.
    pub write_latency_p99_us: Option<f64>,
    /// `--disk-mode mirror` (source): guest writes that returned once the destination had
    /// them (`None`: not mirrored).
    pub mirrored_writes: Option<u64>,
    /// Their bytes.
    pub mirrored_bytes: Option<u64>,
    /// Writes that gave up waiting for the mirror and were marked dirty instead.
    pub mirror_fallbacks: Option<u64>,
    /// Latency of the mirrored writes, median, microseconds.
    pub mirrored_write_latency_p50_us: Option<f64>,
    /// The same, 99th percentile.
    pub mirrored_write_latency_p99_us: Option<f64>,
    /// Bytes of the disk the mirror sent (the writes it served and the dirty granules it
    /// drained; counted in `bytes_sent` too).
    #[serde(default)]
    pub mirror_sent_bytes: u64,
}

impl DiskStats {
    /// Recomputes [`Self::amplification`] from the bytes sent and written.
    pub fn set_amplification(&mut self) {
        let after_bulk = self.bytes_sent.saturating_sub(self.bulk_bytes);
        self.amplification = if self.guest_bytes_written > 0 {
            after_bulk as f64 / self.guest_bytes_written as f64
        } else {
            0.0
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_stats_keep_their_keys_and_amplification_counts_only_what_followed_the_bulk_copy() {
        let mut d = DiskStats {
            bytes_sent: 10 << 20,
            bulk_bytes: 8 << 20,
            guest_bytes_written: 1 << 20,
            ..Default::default()
        };
        d.set_amplification();
        assert_eq!(d.amplification, 2.0);
        let json = serde_json::to_value(&d).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "amplification",
                "bulk_bytes",
                "bytes_on_wire",
                "bytes_sent",
                "committed",
                "digest",
                "granularity",
                "guest_bytes_written",
                "mirror_fallbacks",
                "mirror_sent_bytes",
                "mirrored_bytes",
                "mirrored_write_latency_p50_us",
                "mirrored_write_latency_p99_us",
                "mirrored_writes",
                "path",
                "rounds",
                "size",
                "tracking",
                "write_latency_p50_us",
                "write_latency_p99_us",
                "write_limit_min",
                "write_limit_wait_ms",
                "write_limited_ms"
            ]
        );
    }
}

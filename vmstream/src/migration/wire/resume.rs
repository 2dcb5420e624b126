//! After the commit: the source's [`Handover`] (its guest ended), the destination's
//! [`Resumed`] (its guest runs), the resumed guest's [`GuestSamples`], and the source's
//! [`Audit`] of its frozen memory against what it sent.

use super::fields::{at_least, bool_byte, exact, push_reason, reason_of, Fields};
use super::{FrameType, WireError, MAX_REASON_LEN};

/// `QemuIncoming`: a QEMU guest's destination, right after its `CommitReply{committed}`,
/// tells the source where its QEMU takes the device state (a QEMU migration URI such as
/// `unix:PATH` or `tcp:HOST:PORT`); the source runs QEMU's `migrate` to it before its
/// `Handover`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuIncoming {
    /// The URI, at most 1024 bytes of UTF-8.
    pub uri: String,
}

impl QemuIncoming {
    /// Body length without the URI (its u16 length).
    pub const FIXED_LEN: usize = 2;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        push_reason(out, &self.uri);
    }

    pub(super) fn decode(body: &[u8]) -> Result<QemuIncoming, WireError> {
        const K: FrameType = FrameType::QemuIncoming;
        at_least(K, body, Self::FIXED_LEN, MAX_REASON_LEN)?;
        let mut f = Fields::new(body);
        Ok(QemuIncoming {
            uri: reason_of(K, &mut f)?,
        })
    }
}

/// `Resumed`: when the guest ran again at the destination (32-byte body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// CLOCK_REALTIME instant, ns since the Unix epoch: the guest's first instant running
    /// (or the commit instant when the destination does not run the guest).
    pub at_unix_ns: u64,
    /// Whether a guest runs at the destination.
    pub running: bool,
    /// The resumed guest's transaction count at start (0 when not running).
    pub tx_count: u64,
    /// CPU time (user + system) the destination process used, ns.
    pub receiver_cpu_ns: u64,
}

impl Resumed {
    /// Body length.
    pub const LEN: usize = 32;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.at_unix_ns.to_le_bytes());
        out.push(self.running as u8);
        out.extend_from_slice(&[0; 7]);
        out.extend_from_slice(&self.tx_count.to_le_bytes());
        out.extend_from_slice(&self.receiver_cpu_ns.to_le_bytes());
    }

    pub(super) fn decode(body: &[u8]) -> Result<Resumed, WireError> {
        const K: FrameType = FrameType::Resumed;
        exact(K, body, Self::LEN)?;
        let mut f = Fields::new(body);
        let at_unix_ns = f.u64();
        let running = bool_byte(K, "running", f.u8())?;
        f.bytes(7);
        Ok(Resumed {
            at_unix_ns,
            running,
            tx_count: f.u64(),
            receiver_cpu_ns: f.u64(),
        })
    }
}

/// `Handover`: the source ended its guest after the commit (8-byte body). The destination
/// runs its copy only after this: if the source fails between the commit reply and here,
/// the guest runs nowhere (the committed image waits) rather than in two places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handover {
    /// CLOCK_REALTIME instant, ns since the Unix epoch, when the source guest had ended.
    pub ended_at_unix_ns: u64,
}

impl Handover {
    /// Body length.
    pub const LEN: usize = 8;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ended_at_unix_ns.to_le_bytes());
    }

    pub(super) fn decode(body: &[u8]) -> Result<Handover, WireError> {
        exact(FrameType::Handover, body, Self::LEN)?;
        let mut f = Fields::new(body);
        Ok(Handover {
            ended_at_unix_ns: f.u64(),
        })
    }
}

/// What the source's post-commit audit found (`Audit.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AuditStatus {
    /// Every page of the source's memory at the pause hashes as it was sent.
    Match = 0,
    /// Some pages differ from what was sent: the destination holds stale copies of them.
    Mismatch = 1,
    /// The audit could not be completed (the source's memory could not be read).
    Incomplete = 2,
}

/// `Audit`: after an incremental digest, the source compared all of its memory at the pause
/// with the hash of each page as sent (which the digest proved the destination holds);
/// 24 bytes + 8 per listed page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    /// The verdict.
    pub status: AuditStatus,
    /// Pages compared.
    pub pages_checked: u64,
    /// Pages that differ (may exceed the list).
    pub mismatched: u64,
    /// The first differing pages, ascending, at most [`Self::MAX_PAGES`].
    pub pages: Vec<u64>,
}

impl Audit {
    /// Body length without the page list.
    pub const FIXED_LEN: usize = 24;
    /// Most pages listed.
    pub const MAX_PAGES: usize = 1024;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let n = self.pages.len().min(Self::MAX_PAGES);
        out.push(self.status as u8);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&(n as u32).to_le_bytes());
        out.extend_from_slice(&self.pages_checked.to_le_bytes());
        out.extend_from_slice(&self.mismatched.to_le_bytes());
        for p in &self.pages[..n] {
            out.extend_from_slice(&p.to_le_bytes());
        }
    }

    pub(super) fn decode(body: &[u8]) -> Result<Audit, WireError> {
        const K: FrameType = FrameType::Audit;
        at_least(K, body, Self::FIXED_LEN, 8 * Self::MAX_PAGES)?;
        let mut f = Fields::new(body);
        let bad = |field: &'static str, value: u64| WireError::BadField {
            kind: K.name(),
            field,
            value,
        };
        let status = match f.u8() {
            0 => AuditStatus::Match,
            1 => AuditStatus::Mismatch,
            2 => AuditStatus::Incomplete,
            v => return Err(bad("status", v as u64)),
        };
        f.bytes(3);
        let n = f.u32() as usize;
        exact(K, body, Self::FIXED_LEN + 8 * n)?;
        let pages_checked = f.u64();
        let mismatched = f.u64();
        let pages: Vec<u64> = (0..n).map(|_| f.u64()).collect();
        if (n as u64) > mismatched || pages.windows(2).any(|w| w[1] <= w[0]) {
            return Err(bad("pages", n as u64));
        }
        if (status == AuditStatus::Match) != (mismatched == 0) {
            return Err(bad("mismatched", mismatched));
        }
        Ok(Audit {
            status,
            pages_checked,
            mismatched,
            pages,
        })
    }
}

/// `GuestSamples`: readings of the resumed guest's transaction counter on the destination
/// (8 bytes + 16 per sample), for the guest-impact timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSamples {
    /// `(CLOCK_REALTIME ns since the Unix epoch, transactions committed)`, in time order.
    pub samples: Vec<(u64, u64)>,
}

impl GuestSamples {
    /// Body length without the samples.
    pub const FIXED_LEN: usize = 8;
    /// Most samples in one message (about 100 s at 100 ms).
    pub const MAX_SAMPLES: usize = 1024;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let n = self.samples.len().min(Self::MAX_SAMPLES);
        out.extend_from_slice(&(n as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for &(at, tx) in &self.samples[..n] {
            out.extend_from_slice(&at.to_le_bytes());
            out.extend_from_slice(&tx.to_le_bytes());
        }
    }

    pub(super) fn decode(body: &[u8]) -> Result<GuestSamples, WireError> {
        const K: FrameType = FrameType::GuestSamples;
        at_least(K, body, Self::FIXED_LEN, 16 * Self::MAX_SAMPLES)?;
        let mut f = Fields::new(body);
        let n = f.u32() as usize;
        let reserved = f.u32();
        if reserved != 0 {
            return Err(WireError::BadField {
                kind: K.name(),
                field: "reserved",
                value: reserved as u64,
            });
        }
        exact(K, body, Self::FIXED_LEN + 16 * n)?;
        let samples: Vec<(u64, u64)> = (0..n).map(|_| (f.u64(), f.u64())).collect();
        if samples.windows(2).any(|w| w[1].0 < w[0].0) {
            return Err(WireError::BadField {
                kind: K.name(),
                field: "order",
                value: n as u64,
            });
        }
        Ok(GuestSamples { samples })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_samples_lengths_and_order_are_checked() {
        let m = GuestSamples {
            samples: vec![(1, 2), (3, 4)],
        };
        let mut body = Vec::new();
        m.encode(&mut body);
        assert_eq!(body.len(), GuestSamples::FIXED_LEN + 32);
        assert_eq!(GuestSamples::decode(&body), Ok(m.clone()));
        // The count says 3, two are present.
        body[0] = 3;
        assert!(matches!(
            GuestSamples::decode(&body),
            Err(WireError::BodyLength { .. })
        ));
        let mut body = Vec::new();
        GuestSamples {
            samples: vec![(5, 0), (4, 0)],
        }
        .encode(&mut body);
        assert!(matches!(
            GuestSamples::decode(&body),
            Err(WireError::BadField { field: "order", .. })
        ));
        let too_many = GuestSamples {
            samples: vec![(0, 0); GuestSamples::MAX_SAMPLES + 5],
        };
        let mut body = Vec::new();
        too_many.encode(&mut body);
        assert_eq!(
            GuestSamples::decode(&body).unwrap().samples.len(),
            GuestSamples::MAX_SAMPLES
        );
    }
}

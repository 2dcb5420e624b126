//! Post-copy (`FEATURE_POSTCOPY`, `POSTCOPY.md`): the pages still owed at the switchover
//! ([`PostcopyOwed`], [`PostcopyStart`]), the destination's requests for faulted pages
//! ([`PageRequest`]), the pages themselves ([`PostcopyPage`]), the destination's verdict
//! once the last page landed ([`PostcopyComplete`]) and, after a lost link, the
//! reconnection's [`PostcopyReconnect`], and the requested pages' own connection's
//! [`PostcopyPreempt`].

use super::fields::{at_least, exact, Fields};
use super::{FrameType, WireError};
use crate::memory::PAGE_SIZE;
use crate::telemetry::postcopy::{LatencyMs, PostcopyStats};

/// `PostcopyPage` flag: sent because the destination asked for it (a guest fault).
pub const PAGE_REQUESTED: u32 = 1 << 0;

/// `PostcopyOwed`: part of the list of pages the destination does not hold yet (8-byte
/// header + 8 per page, strictly ascending, at most [`PostcopyOwed::MAX_PAGES`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostcopyOwed {
    /// Page numbers, strictly ascending.
    pub pages: Vec<u64>,
}

impl PostcopyOwed {
    /// Fixed part of the body.
    pub const FIXED_LEN: usize = 8;
    /// Most pages one message lists.
    pub const MAX_PAGES: usize = 8192;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for p in &self.pages {
            out.extend_from_slice(&p.to_le_bytes());
        }
    }

    pub(super) fn decode(body: &[u8]) -> Result<PostcopyOwed, WireError> {
        const K: FrameType = FrameType::PostcopyOwed;
        at_least(K, body, Self::FIXED_LEN, 8 * Self::MAX_PAGES)?;
        let mut f = Fields::new(body);
        let count = f.u32() as usize;
        f.bytes(4);
        exact(K, body, Self::FIXED_LEN + 8 * count)?;
        let pages: Vec<u64> = (0..count).map(|_| f.u64()).collect();
        if let Some(w) = pages.windows(2).find(|w| w[0] >= w[1]) {
            return Err(WireError::BadField {
                kind: K.name(),
                field: "pages (not strictly ascending)",
                value: w[1],
            });
        }
        Ok(PostcopyOwed { pages })
    }
}

/// `PostcopyStart`: the owed list is complete (32-byte body). From the source at the
/// switchover: the destination may commit and, once told the source guest ended
/// (`Handover`), resume the guest. From the destination after a `PostcopyReconnect`: the
/// pages it still lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostcopyStart {
    /// Pages listed in the `PostcopyOwed` messages before this one.
    pub owed: u64,
    /// CLOCK_REALTIME of the pause, ns since the Unix epoch (the blackout's start).
    pub paused_at_unix_ns: u64,
    /// The migration's random id, which a reconnection names.
    pub migration_id: [u8; 16],
}

impl PostcopyStart {
    /// Body length.
    pub const LEN: usize = 32;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.owed.to_le_bytes());
        out.extend_from_slice(&self.paused_at_unix_ns.to_le_bytes());
        out.extend_from_slice(&self.migration_id);
    }

    pub(super) fn decode(body: &[u8]) -> Result<PostcopyStart, WireError> {
        exact(FrameType::PostcopyStart, body, Self::LEN)?;
        let mut f = Fields::new(body);
        Ok(PostcopyStart {
            owed: f.u64(),
            paused_at_unix_ns: f.u64(),
            migration_id: f.bytes(16).try_into().expect("16 bytes"),
        })
    }
}

/// `PageRequest`: the resumed guest faulted on an owed page (8-byte body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// The page.
    pub page: u64,
}

impl PageRequest {
    /// Body length.
    pub const LEN: usize = 8;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.page.to_le_bytes());
    }

    pub(super) fn decode(body: &[u8]) -> Result<PageRequest, WireError> {
        exact(FrameType::PageRequest, body, Self::LEN)?;
        Ok(PageRequest {
            page: Fields::new(body).u64(),
        })
    }
}

/// `PostcopyPage`: one owed page as it was at the pause, raw (16 + 4096-byte body). The
/// frame's body CRC32C is its check: a page whose check fails is never placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostcopyPage {
    /// The page.
    pub page: u64,
    /// [`PAGE_REQUESTED`] or 0 (the background stream).
    pub flags: u32,
    /// Its contents, [`PAGE_SIZE`] bytes.
    pub data: Vec<u8>,
}

impl PostcopyPage {
    /// Body length.
    pub const LEN: usize = 16 + PAGE_SIZE;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.page.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.data);
    }

    pub(super) fn decode(body: &[u8]) -> Result<PostcopyPage, WireError> {
        const K: FrameType = FrameType::PostcopyPage;
        exact(K, body, Self::LEN)?;
        let mut f = Fields::new(body);
        let page = f.u64();
        let flags = f.u32();
        let reserved = f.u32();
        if flags & !PAGE_REQUESTED != 0 || reserved != 0 {
            return Err(WireError::BadField {
                kind: K.name(),
                field: "flags",
                value: flags as u64,
            });
        }
        Ok(PostcopyPage {
            page,
            flags,
            data: f.rest().to_vec(),
        })
    }
}

/// `PostcopyComplete.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PostcopyStatus {
    /// Every owed page landed and the digest equals the source's at the pause.
    Match = 0,
    /// Every owed page landed but the digests differ.
    Mismatch = 1,
}

/// `PostcopyComplete`: the destination placed the last owed page and compared digests; the
/// source may release its frozen memory (112-byte body). Latencies in ns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostcopyComplete {
    /// Match or mismatch.
    pub status: PostcopyStatus,
    /// Owed pages placed.
    pub pages_placed: u64,
    /// Of them, placed because the guest faulted on them.
    pub pages_faulted: u64,
    /// Of them, placed from the background stream before any fault.
    pub pages_streamed: u64,
    /// Pages that arrived already placed, dropped.
    pub pages_dropped: u64,
    /// Fault to placement, median.
    pub fault_p50_ns: u64,
    /// Fault to placement, 99th percentile.
    pub fault_p99_ns: u64,
    /// Fault to placement, longest.
    pub fault_max_ns: u64,
    /// From the resume to the last page placed.
    pub resume_to_last_page_ns: u64,
    /// Guest transactions committed from the resume to the last page.
    pub tx_during: u64,
    /// The destination's digest of the memory as the pages arrived.
    pub digest: [u8; 32],
}

impl PostcopyComplete {
    /// The statistics it carries (both sides record them; `mode`, `pages_owed`,
    /// `pages_refused` and `requests_served` are each side's own).
    pub fn stats(&self) -> PostcopyStats {
        let ms = |ns: u64| ns as f64 / 1e6;
        let span = self.resume_to_last_page_ns as f64 / 1e9;
        PostcopyStats {
            pages_faulted: self.pages_faulted,
            pages_streamed: self.pages_streamed,
            pages_dropped: self.pages_dropped,
            fault_latency_ms: LatencyMs {
                p50: ms(self.fault_p50_ns),
                p99: ms(self.fault_p99_ns),
                max: ms(self.fault_max_ns),
            },
            resume_to_last_page_ms: ms(self.resume_to_last_page_ns),
            tps_during: (span > 0.0).then(|| self.tx_during as f64 / span),
            digest: match self.status {
                PostcopyStatus::Match => "match",
                PostcopyStatus::Mismatch => "mismatch",
            }
            .into(),
            ..PostcopyStats::default()
        }
    }

    /// Body length.
    pub const LEN: usize = 8 + 8 * 9 + 32;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.status as u8);
        out.extend_from_slice(&[0; 7]);
        for v in [
            self.pages_placed,
            self.pages_faulted,
            self.pages_streamed,
            self.pages_dropped,
            self.fault_p50_ns,
            self.fault_p99_ns,
            self.fault_max_ns,
            self.resume_to_last_page_ns,
            self.tx_during,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.digest);
    }

    pub(super) fn decode(body: &[u8]) -> Result<PostcopyComplete, WireError> {
        const K: FrameType = FrameType::PostcopyComplete;
        exact(K, body, Self::LEN)?;
        let mut f = Fields::new(body);
        let status = match f.u8() {
            0 => PostcopyStatus::Match,
            1 => PostcopyStatus::Mismatch,
            v => {
                return Err(WireError::BadField {
                    kind: K.name(),
                    field: "status",
                    value: v as u64,
                })
            }
        };
        f.bytes(7);
        Ok(PostcopyComplete {
            status,
            pages_placed: f.u64(),
            pages_faulted: f.u64(),
            pages_streamed: f.u64(),
            pages_dropped: f.u64(),
            fault_p50_ns: f.u64(),
            fault_p99_ns: f.u64(),
            fault_max_ns: f.u64(),
            resume_to_last_page_ns: f.u64(),
            tx_during: f.u64(),
            digest: f.bytes(32).try_into().expect("32 bytes"),
        })
    }
}

/// `PostcopyReconnect`: the first frame of a connection that replaces a post-copy link
/// that dropped (source -> destination), naming the migration it continues (24-byte body).
/// The destination answers with the pages it still lacks (`PostcopyOwed` messages, then a
/// `PostcopyStart` whose `owed` is their count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostcopyReconnect {
    /// The migration's random id (as in `ChannelHello`).
    pub migration_id: [u8; 16],
    /// How many times the source reconnected before (0 for the first).
    pub attempt: u64,
}

impl PostcopyReconnect {
    /// Body length.
    pub const LEN: usize = 24;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.migration_id);
        out.extend_from_slice(&self.attempt.to_le_bytes());
    }

    pub(super) fn decode(body: &[u8]) -> Result<PostcopyReconnect, WireError> {
        exact(FrameType::PostcopyReconnect, body, Self::LEN)?;
        let mut f = Fields::new(body);
        Ok(PostcopyReconnect {
            migration_id: f.bytes(16).try_into().expect("16 bytes"),
            attempt: f.u64(),
        })
    }
}

/// `PostcopyPreempt`: the first frame of the connection that carries post-copy's requested
/// pages (`FEATURE_POSTCOPY_PREEMPT`; source -> destination, after the key exchange),
/// naming the migration (16-byte body). Nothing else but `PostcopyPage{REQUESTED}` frames
/// follows on it, and the destination writes nothing on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostcopyPreempt {
    /// The migration's random id (as in `PostcopyStart`).
    pub migration_id: [u8; 16],
}

impl PostcopyPreempt {
    /// Body length.
    pub const LEN: usize = 16;

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.migration_id);
    }

    pub(super) fn decode(body: &[u8]) -> Result<PostcopyPreempt, WireError> {
        exact(FrameType::PostcopyPreempt, body, Self::LEN)?;
        Ok(PostcopyPreempt {
            migration_id: body.try_into().expect("16 bytes"),
        })
    }
}

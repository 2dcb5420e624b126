//! The destination's checks of a source's `Hello`: what it refuses before anything sized
//! from the guest exists, and how it answers a refusal.

use crate::memory::PAGE_SIZE;
use crate::migration::dest::incoming::IncomingGuest;
use crate::migration::dest::machine::Dest;
use crate::migration::error::RecvError;
use crate::migration::wire::{
    Hello, HelloReply, Message, RefuseCode, FEATURE_DISKS, FEATURE_MEMORY_DIGEST, FEATURE_POSTCOPY,
    KNOWN_FEATURES,
};

impl Dest<'_> {
    /// Checks a `Hello` (with the checks of `guest`, of the kind it announces); `Some`
    /// refusal if we cannot take this guest.
    pub(super) fn check_hello(
        &self,
        h: &Hello,
        guest: &dyn IncomingGuest,
    ) -> Option<(RefuseCode, String)> {
        if h.page_size != PAGE_SIZE as u32 {
            return Some((
                RefuseCode::PageSize,
                format!(
                    "page size {} (this destination uses {PAGE_SIZE})",
                    h.page_size
                ),
            ));
        }
        if let Some(refusal) = guest.check_hello(h, self.cfg.resume) {
            return Some(refusal);
        }
        if h.features & !KNOWN_FEATURES != 0 || h.features & FEATURE_MEMORY_DIGEST == 0 {
            return Some((
                RefuseCode::Features,
                format!(
                    "features {:#x}: known {KNOWN_FEATURES:#x}, the memory digest is required",
                    h.features
                ),
            ));
        }
        if h.codec_version != Hello::CODEC_VERSION {
            return Some((
                RefuseCode::Version,
                format!(
                    "codec packet format {} (this destination reads {})",
                    h.codec_version,
                    Hello::CODEC_VERSION
                ),
            ));
        }
        if h.guest_size == 0 || !h.guest_size.is_multiple_of(PAGE_SIZE as u64) {
            return Some((
                RefuseCode::GuestSize,
                format!(
                    "guest size {} must be a non-zero multiple of {PAGE_SIZE}",
                    h.guest_size
                ),
            ));
        }
        if let Some(want) = self.cfg.expect_size {
            if h.guest_size != want {
                return Some((
                    RefuseCode::GuestSize,
                    format!(
                        "guest memory size mismatch: source has {} bytes, destination expects {want}",
                        h.guest_size
                    ),
                ));
            }
        }
        // Refused here, before anything sized from the guest exists (image, page tables).
        let (cap, set_by) = self.cfg.size_cap();
        if h.guest_size > cap {
            return Some((
                RefuseCode::GuestSize,
                format!(
                    "guest size {} bytes is above this destination's limit of {cap} bytes \
                     ({set_by})",
                    h.guest_size
                ),
            ));
        }
        if h.features & FEATURE_POSTCOPY != 0 && h.features & FEATURE_DISKS != 0 {
            return Some((
                RefuseCode::Features,
                "post-copy does not move disks (yet): migrate disks with pre-copy".into(),
            ));
        }
        if h.features & FEATURE_POSTCOPY != 0 {
            let image = self.claim.as_ref().map(|c| c.target());
            if let Some(reason) = super::postcopy::refusal(h, self.cfg.resume, image) {
                return Some((RefuseCode::Features, reason));
            }
        }
        None
    }

    pub(super) fn refuse(&mut self, code: RefuseCode, reason: String) -> RecvError {
        let _ = self.send(&Message::HelloReply(HelloReply {
            refuse: code,
            receiver_workers: 0,
            resumes: false,
            reason: reason.clone(),
        }));
        RecvError::Refused { code, reason }
    }
}

//! The destination's disks (`recv --disk`): their claimed targets, the check of the
//! source's `Disks` against them, their temporary images (mapped after guest memory's, all
//! its regions', in one span, which the codec's workers write), their digests, and their
//! commit together with the memory.

use std::path::PathBuf;

use crate::memory::PAGE_SIZE;
use crate::migration::config::RecvConfig;
use crate::migration::digest::{hex, PageHashes};
use crate::migration::error::RecvError;
use crate::migration::image::{ImageError, PendingImage, Reservation, SpanMapping};
use crate::migration::transport::Frame;
use crate::migration::wire::{
    CommitReply, CommitStatus, Disks, Hello, Message, RefuseCode, FEATURE_DISKS, FEATURE_MIRROR,
    MIRROR_OPEN,
};
use crate::telemetry::disk::DiskStats;

use super::machine::{unexpected, Dest};

/// Largest disk this destination takes (a sparse file; the span of all images must fit
/// the address space).
const MAX_DISK_SIZE: u64 = 16 << 40;

/// The disks being received.
pub(super) struct DestDisks {
    targets: Vec<PathBuf>,
    granularity: u64,
    sizes: Vec<u64>,
    images: Vec<PendingImage>,
    /// The digests of the source, once its `DiskDigests` came.
    source_digests: Option<Vec<[u8; 32]>>,
    /// Our digests, once the final round passed its barrier.
    ours: Vec<[u8; 32]>,
    /// `FEATURE_MIRROR`: the migration id the mirror's connection names.
    pub(super) mirror_id: Option<[u8; 16]>,
}

/// Claims every `--disk` target (as the memory's: its temporary file, locked; see
/// [`Reservation`]).
pub(super) fn claim_disks(cfg: &RecvConfig) -> Result<Vec<Reservation>, RecvError> {
    cfg.disks
        .iter()
        .map(|target| Reservation::claim(target, &cfg.notices).map_err(RecvError::from))
        .collect()
}

/// Why the source's disks (`None`: it announced none) cannot be received into `targets`.
fn refusal(targets: &[PathBuf], disks: Option<&Disks>) -> Option<String> {
    let sizes = disks.map_or(&[][..], |d| &d.sizes[..]);
    if sizes.len() != targets.len() {
        return Some(format!(
            "disk count mismatch: the source sends {} disk(s), this destination receives {} \
             (recv --disk)",
            sizes.len(),
            targets.len()
        ));
    }
    for (i, (size, target)) in sizes.iter().zip(targets).enumerate() {
        if *size > MAX_DISK_SIZE {
            return Some(format!(
                "disk {i}: {size} bytes is above this destination's limit of {MAX_DISK_SIZE}"
            ));
        }
        // An existing target of another size is another disk: replacing it is a mistake.
        if let Ok(m) = std::fs::symlink_metadata(target) {
            if m.is_file() && m.len() != *size {
                return Some(format!(
                    "disk size mismatch: the source's disk {i} has {size} bytes, {} has {}",
                    target.display(),
                    m.len()
                ));
            }
        }
    }
    None
}

impl Dest<'_> {
    /// After the `Hello` (and the `ChannelHello`): reads the source's `Disks` if it
    /// announced any and checks them against `--disk`; sizes the disks' temporary images.
    /// A mismatch is refused (`HelloReply{status 10}`) before any image is sized.
    pub(super) fn handshake_disks(&mut self, hello: &Hello) -> Result<(), RecvError> {
        let disks = if hello.features & FEATURE_DISKS != 0 {
            match self.reader.read_frame()? {
                Frame::Control(Message::Disks(d)) => Some(d),
                other => return Err(unexpected("the disks", other)),
            }
        } else {
            None
        };
        if let Some(reason) = refusal(&self.cfg.disks, disks.as_ref()) {
            return Err(self.refuse(RefuseCode::Disks, reason));
        }
        let Some(disks) = disks else { return Ok(()) };
        // Mirroring: its opening follows, naming the migration its connection will name.
        let mirror_id = if hello.features & FEATURE_MIRROR != 0 {
            match self.reader.read_frame()? {
                Frame::Control(Message::MirrorWrite(w)) if w.flags & MIRROR_OPEN != 0 => Some(
                    w.data[..]
                        .try_into()
                        .expect("16 bytes, checked by the decoder"),
                ),
                other => return Err(unexpected("the disk mirror's opening", other)),
            }
        } else {
            None
        };
        let mut images = Vec::with_capacity(disks.sizes.len());
        for (claim, size) in std::mem::take(&mut self.disk_claims)
            .into_iter()
            .zip(&disks.sizes)
        {
            match PendingImage::create(claim, *size) {
                Ok(i) => images.push(i),
                Err(e) => return Err(self.refuse(RefuseCode::Other, e.to_string())),
            }
        }
        self.disks = Some(DestDisks {
            targets: self.cfg.disks.clone(),
            granularity: disks.granularity,
            sizes: disks.sizes,
            images,
            source_digests: None,
            ours: Vec::new(),
            mirror_id,
        });
        Ok(())
    }

    /// Reads the source's `DiskDigests` (right behind its `Digest`) when disks travel.
    pub(super) fn read_disk_digests(&mut self) -> Result<(), RecvError> {
        if self.disks.is_none() {
            return Ok(());
        }
        let digests = match self.reader.read_frame()? {
            Frame::Control(Message::DiskDigests(d)) => d,
            other => return Err(unexpected("the disk digests", other)),
        };
        if let Some(d) = &mut self.disks {
            d.source_digests = Some(digests.digests);
        }
        Ok(())
    }

    /// Compares each disk's digest of what this side holds with the source's; a mismatch
    /// is answered (with our `memory_digest`) and refused, nothing committed. Records the
    /// disks' statistics.
    pub(super) fn check_disk_digests(&mut self, memory_digest: [u8; 32]) -> Result<(), RecvError> {
        let Some(d) = &self.disks else { return Ok(()) };
        let ours = d.ours.clone();
        let theirs = d.source_digests.clone().unwrap_or_default();
        self.stats.disks = d
            .targets
            .iter()
            .zip(&d.sizes)
            .zip(&ours)
            .map(|((t, &size), digest)| DiskStats {
                path: t.display().to_string(),
                size,
                granularity: d.granularity,
                digest: Some(hex(digest)),
                ..Default::default()
            })
            .collect();
        let bad = (0..ours.len()).find(|&i| theirs.get(i) != Some(&ours[i]));
        let Some(i) = bad.or((theirs.len() != ours.len()).then_some(ours.len())) else {
            return Ok(());
        };
        let err = RecvError::DigestMismatch {
            source_digest: theirs.get(i).map_or_else(|| "none".into(), hex),
            ours: format!(
                "{} (disk {i}, {})",
                ours.get(i).map_or_else(|| "none".into(), hex),
                d.targets
                    .get(i)
                    .map_or_else(String::new, |t| t.display().to_string())
            ),
        };
        let _ = self.send(&Message::CommitReply(CommitReply {
            status: CommitStatus::DigestMismatch,
            digest: memory_digest,
            reason: err.to_string(),
        }));
        Err(err)
    }
}

impl Dest<'_> {
    /// One mapping of `memory`'s image, the other regions' and every disk's, back to back,
    /// for the receive pipeline; None when `memory`'s is the only image.
    pub(super) fn span(&self, memory: &PendingImage) -> Result<Option<SpanMapping>, RecvError> {
        let mut files = vec![(memory.handle(), memory.size())];
        let regions = self.regions.as_ref().map_or(&[][..], |r| r.images());
        files.extend(regions.iter().map(|i| (i.handle(), i.size())));
        if let Some(d) = &self.disks {
            files.extend(d.images().iter().map(|i| (i.handle(), i.size())));
        }
        if files.len() == 1 {
            return Ok(None);
        }
        SpanMapping::map(&files).map(Some).map_err(|source| {
            RecvError::Image(ImageError::Io {
                what: "mapping the memory and disk images together".into(),
                source,
            })
        })
    }
}

impl DestDisks {
    /// The disks' temporary images, mapped after guest memory's (`Dest::span`).
    pub(super) fn images(&self) -> &[PendingImage] {
        &self.images
    }

    /// What the mirror writes (`super::mirror`): each disk's temporary image, its size and
    /// first page after the `memory_pages`.
    pub(super) fn mirror_targets(
        &self,
        memory_pages: u64,
    ) -> std::io::Result<Vec<super::mirror::MirrorTarget>> {
        let mut first_page = memory_pages;
        self.images
            .iter()
            .zip(&self.sizes)
            .map(|(image, &size)| {
                let t = super::mirror::MirrorTarget {
                    file: image.handle().try_clone()?,
                    size,
                    first_page,
                };
                first_page += size / PAGE_SIZE as u64;
                Ok(t)
            })
            .collect()
    }

    /// Pages the disks add after guest memory's.
    pub(super) fn pages(&self) -> u64 {
        self.sizes.iter().map(|s| s / PAGE_SIZE as u64).sum()
    }

    /// Takes each disk's digest from the page hashes the workers kept (disk pages after
    /// the `memory_pages`), once the final round passed its barrier.
    pub(super) fn record_digests(&mut self, hashes: &PageHashes, memory_pages: u64) {
        let mut first = memory_pages;
        self.ours = self
            .sizes
            .iter()
            .map(|&size| {
                let pages = size / PAGE_SIZE as u64;
                let d = hashes.disk_digest(first..first + pages);
                first += pages;
                d
            })
            .collect();
    }

    /// Syncs every disk image to its file system (before any is renamed).
    pub(super) fn sync(&self) -> Result<(), ImageError> {
        self.images.iter().try_for_each(PendingImage::sync)
    }

    /// Renames every disk image over its target.
    pub(super) fn commit(self) -> Result<(), ImageError> {
        for image in self.images {
            image.commit()?;
        }
        Ok(())
    }
}

/// Checks the `--disk` targets before anything is claimed: at most 16, usable paths (as
/// the memory file's), none named twice or equal to the memory file, and not without
/// `--memory-file` (a handover moves no disks).
pub(super) fn check_disk_targets(cfg: &RecvConfig) -> Result<(), RecvError> {
    use crate::migration::wire::MAX_DISKS;
    if cfg.disks.is_empty() {
        return Ok(());
    }
    if cfg.disks.len() > MAX_DISKS {
        return Err(RecvError::Config(format!(
            "{} --disk given: at most {MAX_DISKS}",
            cfg.disks.len()
        )));
    }
    if cfg.memory_file.is_none() {
        return Err(RecvError::Config(
            "--disk needs --memory-file (a handover moves no disks)".into(),
        ));
    }
    for (i, d) in cfg.disks.iter().enumerate() {
        crate::migration::image::check_target(d)?;
        if cfg.memory_file.as_ref() == Some(d) || cfg.disks[..i].contains(d) {
            return Err(RecvError::Config(format!(
                "--disk {}: named twice (or as the --memory-file)",
                d.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_refused_on_a_count_or_an_existing_targets_size() {
        let dir = std::env::temp_dir().join(format!("vmstream-dest-disks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.img"), dir.join("b.img"));
        std::fs::File::create(&b).unwrap().set_len(8192).unwrap();
        let disks = |sizes: Vec<u64>| Disks {
            granularity: 4096,
            sizes,
        };
        let targets = [a.clone(), b.clone()];
        assert_eq!(refusal(&targets, Some(&disks(vec![4096, 8192]))), None);
        let r = refusal(&targets, Some(&disks(vec![4096]))).unwrap();
        assert!(
            r.starts_with("disk count mismatch: the source sends 1 disk(s)"),
            "{r}"
        );
        let r = refusal(&targets, None).unwrap();
        assert!(
            r.contains("sends 0 disk(s), this destination receives 2"),
            "{r}"
        );
        let r = refusal(&targets, Some(&disks(vec![4096, 4096]))).unwrap();
        assert!(
            r.starts_with("disk size mismatch: the source's disk 1 has 4096 bytes"),
            "{r}"
        );
        assert_eq!(refusal(&[], None), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn disk_targets_named_twice_or_as_the_memory_file_are_refused() {
        let dir = std::env::temp_dir();
        let mut cfg = RecvConfig::new("127.0.0.1:0", dir.join("mem.img"));
        cfg.disks = vec![dir.join("d0.img"), dir.join("d1.img")];
        assert!(check_disk_targets(&cfg).is_ok());
        cfg.disks.push(dir.join("d0.img"));
        assert!(matches!(
            check_disk_targets(&cfg),
            Err(RecvError::Config(_))
        ));
        cfg.disks = vec![dir.join("mem.img")];
        assert!(matches!(
            check_disk_targets(&cfg),
            Err(RecvError::Config(_))
        ));
        cfg.disks = vec![dir.join("d0.img")];
        cfg.memory_file = None;
        assert!(matches!(
            check_disk_targets(&cfg),
            Err(RecvError::Config(_))
        ));
    }
}

//! The destination's checks of a source's `Hello`: what it refuses before anything sized
//! from the guest exists, and how it answers a refusal; with them the checks of guest
//! memory's regions (a QEMU VM's several RAM backends, `recv --memory-file` given once per
//! backend, against the source's `MemoryRegions`) and the sizing of their images.

use crate::memory::PAGE_SIZE;
use crate::migration::config::RecvConfig;
use crate::migration::dest::incoming::IncomingGuest;
use crate::migration::dest::machine::{unexpected, Dest};
use crate::migration::error::RecvError;
use crate::migration::image::{RegionImages, Reservation};
use crate::migration::transport::Frame;
use crate::migration::wire::{
    GuestKind, Hello, HelloReply, Message, RefuseCode, FEATURE_DISKS, FEATURE_MEMORY_DIGEST,
    FEATURE_MEMORY_REGIONS, FEATURE_POSTCOPY, KNOWN_FEATURES,
};

/// Why a source whose memory is `sizes` (one size: a single file) cannot be received
/// here: the count differs from the `--memory-file`s, the sizes do not add up to the
/// `Hello`'s, or a size differs from the one the `--qemu` command line gives that backend.
pub(super) fn regions_refusal(cfg: &RecvConfig, guest_size: u64, sizes: &[u64]) -> Option<String> {
    let ours = 1 + cfg.memory_regions.len();
    if sizes.len() != ours {
        return Some(format!(
            "memory region count mismatch: the source's memory is {} file(s) (RAM backends), \
             this destination receives {ours} (recv --memory-file)",
            sizes.len()
        ));
    }
    if sizes.iter().sum::<u64>() != guest_size {
        return Some(format!(
            "the memory regions add up to {} bytes, the hello says {guest_size}",
            sizes.iter().sum::<u64>()
        ));
    }
    if sizes.len() == 1 {
        return None;
    }
    let launch = cfg.qemu.as_ref()?;
    sizes.iter().enumerate().find_map(|(i, &size)| {
        let said = launch.backend_size(i)?;
        (said != size).then(|| {
            format!(
                "memory region size mismatch: the source's region {i} has {size} bytes, the \
                 --qemu command line's backend on {{memory{i}}} has size {said}"
            )
        })
    })
}

/// Checks the `--memory-file`s after the first before anything is claimed: only for a
/// QEMU VM (`--qemu`, whose command line names each: `{memory1}`...), usable paths, none
/// named twice or as a `--disk`.
pub(super) fn check_region_targets(cfg: &RecvConfig) -> Result<(), RecvError> {
    if cfg.memory_regions.is_empty() {
        return Ok(());
    }
    let Some(launch) = &cfg.qemu else {
        return Err(RecvError::Config(
            "--memory-file given more than once: only a QEMU VM's RAM backends (--qemu) \
             travel as several files"
                .into(),
        ));
    };
    let count = 1 + cfg.memory_regions.len();
    if count > crate::memory::MAX_MEMORY_REGIONS {
        return Err(RecvError::Config(format!(
            "{count} --memory-file given: at most {}",
            crate::memory::MAX_MEMORY_REGIONS
        )));
    }
    launch
        .check_placeholders(count)
        .map_err(RecvError::Config)?;
    for (i, target) in cfg.memory_regions.iter().enumerate() {
        crate::migration::image::check_target(target)?;
        if cfg.memory_file.as_ref() == Some(target)
            || cfg.memory_regions[..i].contains(target)
            || cfg.disks.contains(target)
        {
            return Err(RecvError::Config(format!(
                "--memory-file {}: named twice (or as a --disk)",
                target.display()
            )));
        }
    }
    Ok(())
}

/// Claims the files of the regions after the first (as the memory's: its temporary file,
/// locked; see [`Reservation`]).
pub(super) fn claim_regions(cfg: &RecvConfig) -> Result<Vec<Reservation>, RecvError> {
    cfg.memory_regions
        .iter()
        .map(|target| Reservation::claim(target, &cfg.notices).map_err(RecvError::from))
        .collect()
}

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

impl Dest<'_> {
    /// After the `Hello` (and the `ChannelHello`): reads the source's `MemoryRegions` if it
    /// announced them and checks them ([`regions_refusal`]); returns each region's size (one:
    /// all of guest memory) and sizes the temporary images of the regions after the first.
    /// A mismatch is refused (`HelloReply{status 11}`) before any image is sized.
    pub(super) fn handshake_regions(&mut self, hello: &Hello) -> Result<Vec<u64>, RecvError> {
        let sizes = if hello.features & FEATURE_MEMORY_REGIONS != 0 {
            let regions = match self.reader.read_frame()? {
                Frame::Control(Message::MemoryRegions(r)) => r,
                other => return Err(unexpected("the memory regions", other)),
            };
            if hello.guest_kind != GuestKind::Qemu {
                return Err(self.refuse(
                    RefuseCode::Features,
                    "memory of several files is a QEMU VM's (its RAM backends)".into(),
                ));
            }
            regions.sizes
        } else {
            vec![hello.guest_size]
        };
        if let Some(reason) = regions_refusal(self.cfg, hello.guest_size, &sizes) {
            return Err(self.refuse(RefuseCode::MemoryRegions, reason));
        }
        let claims = std::mem::take(&mut self.region_claims);
        if !claims.is_empty() {
            match RegionImages::create(claims, &sizes[1..]) {
                Ok(images) => self.regions = Some(images),
                Err(e) => return Err(self.refuse(RefuseCode::Other, e.to_string())),
            }
        }
        Ok(sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::dest::incoming::QemuLaunch;

    fn cfg(dir: &std::path::Path, files: usize, command: &str) -> RecvConfig {
        let mut cfg = RecvConfig::new("127.0.0.1:0", dir.join("m0.ram"));
        cfg.memory_regions = (1..files).map(|i| dir.join(format!("m{i}.ram"))).collect();
        cfg.qemu = Some(QemuLaunch::beside(command.into(), &dir.join("m0.ram")));
        cfg
    }

    const TWO: &str = "qemu -object memory-backend-file,id=m0,size=128M,mem-path={memory0},share=on \
                       -object 'memory-backend-file,id=m1,share=on,mem-path={memory1},size=131068K'";

    /// A source whose memory is another number of files than this destination's
    /// `--memory-file`s, regions that do not add up to the hello's size, or a region of
    /// another size than the command line's backend on its placeholder, is refused.
    #[test]
    fn a_region_count_or_size_mismatch_is_refused() {
        let dir = std::env::temp_dir();
        let (a, b) = (128 << 20, 131068 << 10);
        let two = cfg(&dir, 2, TWO);
        assert_eq!(regions_refusal(&two, a + b, &[a, b]), None);
        let r = regions_refusal(&two, a, &[a]).unwrap();
        assert!(
            r.starts_with("memory region count mismatch: the source's memory is 1 file(s)"),
            "{r}"
        );
        let r = regions_refusal(&cfg(&dir, 3, TWO), a + b, &[a, b]).unwrap();
        assert!(
            r.contains("is 2 file(s) (RAM backends), this destination receives 3"),
            "{r}"
        );
        let r = regions_refusal(&two, a + b + 4096, &[a, b]).unwrap();
        assert!(r.contains("add up to"), "{r}");
        let r = regions_refusal(&two, a + a, &[a, a]).unwrap();
        assert!(
            r.starts_with("memory region size mismatch: the source's region 1 has 134217728 bytes"),
            "{r}"
        );
        // Without a size on the command line, any size is taken; one file is as before.
        let free = cfg(
            &dir,
            2,
            "qemu -object x,mem-path={memory0} -object y,mem-path={memory1}",
        );
        assert_eq!(regions_refusal(&free, a + a, &[a, a]), None);
        assert_eq!(
            regions_refusal(&cfg(&dir, 1, "qemu {memory}"), a, &[a]),
            None
        );
    }

    #[test]
    fn several_memory_files_need_a_qemu_command_line_naming_each() {
        let dir = std::env::temp_dir();
        assert!(check_region_targets(&cfg(&dir, 2, TWO)).is_ok());
        let err = |c: &RecvConfig| match check_region_targets(c) {
            Err(RecvError::Config(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(err(&cfg(&dir, 3, TWO)).contains("has no {memory2}"));
        assert!(err(&cfg(&dir, 2, "qemu {memory}")).contains("has no {memory1}"));
        let too_many = cfg(&dir, 2, &format!("{TWO} {{memory2}}"));
        assert!(err(&too_many).contains("names {memory2}, but only 2"));
        let mut no_qemu = cfg(&dir, 2, TWO);
        no_qemu.qemu = None;
        assert!(err(&no_qemu).contains("only a QEMU VM's RAM backends"));
        let mut twice = cfg(&dir, 2, TWO);
        twice.memory_regions = vec![dir.join("m0.ram")];
        assert!(err(&twice).contains("named twice"));
    }
}

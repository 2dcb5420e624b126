//! KVM guests on the destination. Before anything is committed, the `GuestState` blob is
//! parsed and validated ([`VmState::from_bytes`]: magic, version, lengths, CRC, sections)
//! and checked against the received memory (RAM size, the parameter block's vCPU count);
//! a bad blob is answered with `CommitReply { state rejected }` and nothing is committed.
//! With `--resume` the VMM's ledger check runs on the received image before the commit
//! (mostly during the rounds, [`checks`]), and the committed image is mapped as guest RAM,
//! the VM restored in the documented order (vmstream/KVM.md) with its vCPUs held, and only
//! then the vCPUs started ([`resumed`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::guest::kvm::abi::{PARAMS_GPA, PARAMS_MAGIC_VALUE, PARAM_MAGIC, PARAM_VCPUS};
use crate::guest::kvm::memory::{RAM_ALIGN, RAM_MAX, RAM_MIN};
use crate::guest::kvm::{kvm_available, GuestRam, KvmVerifyReport, VmState};
use crate::memory::GuestMemory;
use crate::migration::dest::incoming::{
    IncomingGuest, PostcopyLaunch, PostcopyResumed, Resumption,
};
use crate::migration::dest::machine::Received;
use crate::migration::dest::verify::{BackgroundSlot, BackgroundVerifier, Backlog, TouchedPages};
use crate::migration::digest::PageHashes;
use crate::migration::error::{GuestStateError, RecvError};
use crate::migration::image::PendingImage;
use crate::migration::wire::{GuestKind, GuestSamples, GuestState, Hello, RefuseCode};
use crate::telemetry::notice::Notices;
use crate::telemetry::settings::Settings;

mod checks;
mod known;
mod resumed;

use checks::{check_at_pause, KvmChecks};
pub use resumed::{KvmResumed, KvmRunOutcome};

/// A KVM guest being received.
#[derive(Default)]
pub struct IncomingKvmGuest {
    /// With `--resume`: the block checks of the ledger check during the rounds.
    background: BackgroundSlot<KvmChecks>,
    /// The guest's validated state (from `GuestState`).
    state: Option<VmState>,
    /// With `--resume`: the ledger check of the final image, before the commit.
    verified: Option<Result<KvmVerifyReport, String>>,
    /// The committed image as the codec mapped it; the VM maps it again, and unmapping this
    /// one at the resume would be downtime.
    committed: Option<GuestMemory>,
    resumed: Option<KvmResumed>,
    /// The committed disks the resumed guest writes (`recv --disk`).
    disks: Vec<std::path::PathBuf>,
    /// Told the resume and, as it runs, the guest's rate.
    notices: Notices,
}

impl IncomingKvmGuest {
    /// A KVM guest to receive; its lines once resumed go to `notices`.
    pub fn new(notices: Notices) -> IncomingKvmGuest {
        IncomingKvmGuest {
            notices,
            ..IncomingKvmGuest::default()
        }
    }
}

impl IncomingGuest for IncomingKvmGuest {
    fn kind(&self) -> GuestKind {
        GuestKind::Kvm
    }

    fn check_hello(&self, hello: &Hello, resume: bool) -> Option<(RefuseCode, String)> {
        check_hello(hello, resume)
    }

    fn start_background(
        &mut self,
        view: GuestMemory,
        touched: Arc<TouchedPages>,
    ) -> std::io::Result<()> {
        self.background.start(view, touched, KvmChecks::default())
    }

    fn round_applied(&self) {
        self.background.round_applied()
    }

    fn verify_backlog(&self) -> Option<Backlog> {
        self.background.backlog()
    }

    fn verify_at_pause(&mut self, image: &mut PendingImage, hashes: &PageHashes) {
        self.verified = Some(verify_pending(image, hashes, self.background.take()));
    }

    fn verify_handed_over(
        &mut self,
        memory: &mut [u8],
        _data: crate::migration::dest::verify::DataPages<'_>,
    ) {
        let ram: &[u8] = memory;
        self.verified = Some(
            crate::guest::kvm::Params::read_from(ram)
                .and_then(|params| crate::guest::kvm::verify::verify_known(ram, &params, &|_| None))
                .map_err(|e| e.to_string()),
        );
    }

    fn verify_failure(&self) -> Option<String> {
        match &self.verified {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }

    fn accept_state(
        &mut self,
        state: &GuestState,
        memory: &[u8],
        settings: &mut Settings,
    ) -> Result<(), GuestStateError> {
        let vm = check_state(state, memory)?;
        settings.kvm_vcpus = Some(vm.vcpus.len());
        settings.kvm_state_bytes = Some(state.blob.len());
        self.state = Some(vm);
        Ok(())
    }

    fn committed_disks(&mut self, disks: &[std::path::PathBuf]) {
        self.disks = disks.to_vec();
    }

    /// Restores the VM and starts it; its instant is the first transaction on the
    /// destination: the end of the downtime as the guest sees it.
    fn resume(
        &mut self,
        memory: GuestMemory,
        target: &Path,
        _run_for: Option<Duration>,
    ) -> Result<Resumption, RecvError> {
        let size = memory.len() as u64;
        self.committed = Some(memory);
        let (Some(state), Some(Ok(verified))) = (self.state.take(), self.verified.take()) else {
            return Err(RecvError::Resume("no verified KVM image to resume".into()));
        };
        let (guest, resumption) = KvmResumed::start(
            target,
            size,
            &state,
            verified,
            &self.disks,
            self.notices.clone(),
        )?;
        self.notices.output(format!(
            "resumed kind=kvm tx={} vcpus={} verify=ok blocks={} written_blocks={}",
            guest.tx_start,
            state.vcpus.len(),
            guest.verified.blocks,
            guest.verified.written_blocks
        ));
        self.resumed = Some(guest);
        Ok(resumption)
    }

    /// The VMM maps the committed image as guest RAM and registers that mapping; the VM is
    /// restored and started on the thread `start` runs on, its faults served meanwhile.
    fn postcopy_launch(
        &mut self,
        memory: GuestMemory,
        _run_for: Option<Duration>,
    ) -> Result<PostcopyLaunch, RecvError> {
        let state = self
            .state
            .take()
            .ok_or_else(|| RecvError::Resume("no KVM guest state to resume".into()))?;
        let ram = GuestRam::open(memory.path(), memory.len() as u64)?;
        let faults = ram
            .register_missing()
            .map_err(|e| RecvError::Resume(format!("post-copy: {e}")))?;
        // Never touched (a read of a hole through it would fill the hole behind the
        // userfaultfd's back); unmapped when the receive is done.
        self.committed = Some(memory);
        let notices = self.notices.clone();
        Ok(PostcopyLaunch {
            faults: Arc::new(faults),
            start: Box::new(move || {
                let (guest, _) = KvmResumed::start_postcopy(ram, &state, notices.clone())?;
                notices.output(format!(
                    "resumed kind=kvm tx={} vcpus={} verify=postcopy",
                    guest.tx_start,
                    state.vcpus.len()
                ));
                Ok(PostcopyResumed::Kvm(guest))
            }),
        })
    }

    fn sample(&self, _target: &Path, window: Duration) -> Result<GuestSamples, String> {
        match &self.resumed {
            Some(guest) => guest.sample(window).map_err(|e| e.to_string()),
            None => Err("no KVM guest was resumed".into()),
        }
    }

    fn into_received(self: Box<Self>) -> Received {
        Received {
            guest: None,
            kvm: self.resumed,
            handed_over: None,
            qemu: None,
        }
    }
}

/// Refusals specific to a KVM guest's handshake.
fn check_hello(h: &Hello, resume: bool) -> Option<(RefuseCode, String)> {
    if !(RAM_MIN..=RAM_MAX).contains(&h.guest_size) || !h.guest_size.is_multiple_of(RAM_ALIGN) {
        return Some((
            RefuseCode::GuestSize,
            format!(
                "KVM guest RAM of {} bytes: must be a multiple of 2 MiB in [{RAM_MIN}, {RAM_MAX}]",
                h.guest_size
            ),
        ));
    }
    if resume {
        if let Err(why) = kvm_available() {
            return Some((
                RefuseCode::GuestKind,
                format!("cannot resume a KVM guest here: {why}"),
            ));
        }
    }
    None
}

/// The KVM guest's ledger check on the received image (`image`, not yet committed), done
/// while the source still hashes its memory so it is off the resume path; a failure means
/// nothing is committed. Only what changed since the background last looked is read
/// ([`checks::check_at_pause`]).
fn verify_pending(
    image: &PendingImage,
    hashes: &PageHashes,
    background: Option<BackgroundVerifier<KvmChecks>>,
) -> Result<KvmVerifyReport, String> {
    let ram = checks::FileRam(image.memory());
    check_at_pause(&ram, hashes, background)
        .map(|(report, _)| report)
        .map_err(|e| e.to_string())
}

/// Parses and validates a KVM guest's state and checks it against the received memory.
fn check_state(state: &GuestState, memory: &[u8]) -> Result<VmState, GuestStateError> {
    let vm = VmState::from_bytes(&state.blob)?;
    if vm.memory_size != memory.len() as u64 {
        return Err(GuestStateError::DoesNotFit(format!(
            "state is for {} bytes of RAM, the migrated memory has {}",
            vm.memory_size,
            memory.len()
        )));
    }
    let param = |off: u64| {
        let at = (PARAMS_GPA + off) as usize;
        u64::from_le_bytes(memory[at..at + 8].try_into().expect("8 bytes"))
    };
    if param(PARAM_MAGIC) != PARAMS_MAGIC_VALUE {
        return Err(GuestStateError::DoesNotFit(
            "the migrated memory holds no guest parameter block".into(),
        ));
    }
    if param(PARAM_VCPUS) != vm.vcpus.len() as u64 {
        return Err(GuestStateError::DoesNotFit(format!(
            "the memory was set up for {} vCPUs, the state has {}",
            param(PARAM_VCPUS),
            vm.vcpus.len()
        )));
    }
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_ram_sizes_outside_what_the_vmm_maps_are_refused() {
        let hello = |size: u64| Hello {
            guest_kind: GuestKind::Kvm,
            page_size: 4096,
            guest_size: size,
            features: 0,
            compression: vmstream_codec::Compression::None,
            delta: crate::migration::wire::DeltaWire::Off,
            codec_version: Hello::CODEC_VERSION,
            sender_workers: 1,
            cache_bytes: 0,
            batch_pages: 128,
        };
        for bad in [(64 << 20) + 4096, 2 << 20, RAM_MAX + RAM_ALIGN] {
            assert!(
                matches!(
                    check_hello(&hello(bad), false),
                    Some((RefuseCode::GuestSize, _))
                ),
                "{bad}"
            );
        }
        assert_eq!(check_hello(&hello(64 << 20), false), None);
    }
}

//! KVM guests on the destination. Before anything is committed, the `GuestState` blob is
//! parsed and validated ([`VmState::from_bytes`]: magic, version, lengths, CRC, sections)
//! and checked against the received memory (RAM size, the parameter block's vCPU count);
//! a bad blob is answered with `CommitReply { state rejected }` and nothing is committed.
//! With `--resume` the committed image is mapped as guest RAM, the VM restored in the
//! documented order (vmstream/KVM.md) with its vCPUs held, the VMM's ledger check run on
//! the paused guest, and only then the vCPUs started.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use crate::cli::kvm::{install_stop_handler, report_while_running, stop_requested};
use crate::guest::kvm::abi::{PARAMS_GPA, PARAMS_MAGIC_VALUE, PARAM_MAGIC, PARAM_VCPUS};
use crate::guest::kvm::memory::{RAM_ALIGN, RAM_MAX, RAM_MIN};
use crate::guest::kvm::{kvm_available, GuestRam, KvmGuest, RestoreConfig, VerifyReport, VmState};
use crate::migration::dest::verify::{BackgroundVerifier, KvmChecks, KvmKnownFacts};
use crate::migration::dest::{Dest, DestState};
use crate::migration::digest::PageHashes;
use crate::migration::error::{GuestStateError, RecvError};
use crate::migration::image::PendingImage;
use crate::migration::wire::{
    Abort, AbortCode, CommitReply, CommitStatus, GuestKind, GuestSamples, GuestState, Hello,
    Message, RefuseCode,
};
use crate::telemetry::sampler::SAMPLE_PERIOD;
use crate::telemetry::stats::unix_ns;

/// How long the destination waits for the resumed guest's first transaction (the instant
/// reported as the end of the downtime).
const FIRST_TX_WAIT: Duration = Duration::from_secs(2);

/// Refusals specific to a KVM guest's handshake.
pub(super) fn check_hello(h: &Hello, resume: bool) -> Option<(RefuseCode, String)> {
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
/// nothing is committed. Blocks whose facts follow from the image's page hashes (`hashes`,
/// current after the last barrier: zero pages, and blocks the background checks saw in
/// their current state) are not read.
pub(super) fn verify_pending(
    image: &mut PendingImage,
    hashes: &PageHashes,
    background: Option<BackgroundVerifier<KvmChecks>>,
) -> Result<crate::guest::kvm::VerifyReport, String> {
    // Read through the mapping the codec wrote: its pages are faulted in already.
    let ram: &[u8] = image.memory_mut();
    let params = crate::guest::kvm::Params::read_from(ram).map_err(|e| e.to_string())?;
    let known = KvmKnownFacts::new(background, hashes, params.layout);
    crate::guest::kvm::verify::verify_known(ram, &params, &|b| known.get(b))
        .map_err(|e| e.to_string())
}

/// Checks a `GuestState` against the handshake's guest kind and, for KVM guests, parses
/// and validates the state and checks it against the received memory.
pub(super) fn check_guest_state(
    kind: GuestKind,
    state: &GuestState,
    memory: &[u8],
) -> Result<Option<VmState>, GuestStateError> {
    if state.guest_kind != kind {
        return Err(GuestStateError::KindMismatch {
            hello: kind,
            state: state.guest_kind,
        });
    }
    if kind != GuestKind::Kvm {
        return Ok(None);
    }
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
    Ok(Some(vm))
}

/// A KVM guest resumed on the committed image.
pub struct KvmResumed {
    guest: KvmGuest,
    /// Transactions (all vCPUs) at the resume.
    pub tx_start: u64,
    /// The ledger check before the resume.
    pub verified: VerifyReport,
    /// CLOCK_REALTIME ns of the first transaction observed after the resume.
    first_tx_at_ns: u64,
    /// Time restoring the VM, ms.
    restore_ms: f64,
    /// Time from starting the vCPUs to the first transaction, ms.
    first_tx_ms: f64,
    /// When the vCPUs were started: `--run-for` counts from here, as for a guest process.
    resumed_at: Instant,
}

impl std::fmt::Debug for KvmResumed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmResumed")
            .field("tx_start", &self.tx_start)
            .finish()
    }
}

/// What the resumed KVM guest did until it was stopped.
#[derive(Debug, Clone, Copy)]
pub struct KvmRunOutcome {
    /// Transactions at the resume.
    pub tx_start: u64,
    /// Transactions when paused at the end.
    pub tx_end: u64,
    /// Transactions per second while running.
    pub tps: f64,
    /// The ledger check of the paused guest at the end.
    pub verified: VerifyReport,
}

impl KvmResumed {
    /// Restores the VM from `path` (the committed image) and `state`, verifies the paused
    /// guest, starts its vCPUs and waits (bounded) for its first transaction.
    fn start(
        path: &Path,
        size: u64,
        state: &VmState,
        verified: crate::guest::kvm::VerifyReport,
    ) -> Result<KvmResumed, RecvError> {
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let ram = GuestRam::open(path, size)?;
        let cfg = RestoreConfig {
            start_paused: true,
            ..RestoreConfig::default()
        };
        let mut guest = KvmGuest::restore(ram, state, &cfg)?;
        // The ledger was checked on the received image before the commit.
        let restore_ms = ms(t);
        let tx_start = guest.total_transactions()?;
        guest.resume()?;
        let t = Instant::now();
        while guest.total_transactions()? == tx_start && t.elapsed() < FIRST_TX_WAIT {
            std::thread::sleep(Duration::from_micros(50));
        }
        let first_tx_ms = ms(t);
        Ok(KvmResumed {
            guest,
            tx_start,
            verified,
            first_tx_at_ns: unix_ns(SystemTime::now()),
            restore_ms,
            first_tx_ms,
            resumed_at: t,
        })
    }

    /// Reads the guest's transaction counter every [`SAMPLE_PERIOD`] for `window` (less
    /// if a vCPU fails or SIGINT/SIGTERM arrives): the destination's part of the source's
    /// timeline, as [`sample_destination`](crate::telemetry::impact::sample_destination)
    /// reads a guest process's.
    fn sample(&self, window: Duration) -> Result<GuestSamples, RecvError> {
        install_stop_handler();
        let start = Instant::now();
        let mut samples = Vec::new();
        while samples.len() < GuestSamples::MAX_SAMPLES {
            samples.push((unix_ns(SystemTime::now()), self.guest.total_transactions()?));
            let next = SAMPLE_PERIOD * samples.len() as u32;
            if next > window || stop_requested() || !self.guest.failures().is_empty() {
                break;
            }
            std::thread::sleep(next.saturating_sub(start.elapsed()));
        }
        Ok(GuestSamples { samples })
    }

    /// Runs the guest for `run_for` (None: until SIGINT/SIGTERM), printing its rate every
    /// second, then pauses it, checks the ledger again and requires that its transaction
    /// counter grew.
    pub fn run(mut self, run_for: Option<Duration>) -> Result<KvmRunOutcome, RecvError> {
        let mut out = std::io::stdout().lock();
        // The samples for the source already took part of `run_for`.
        let remaining = run_for.map(|d| d.saturating_sub(self.resumed_at.elapsed()));
        report_while_running(
            &mut self.guest,
            remaining,
            Duration::from_secs(1),
            "kvm",
            false,
            &mut out,
        )?;
        let ran = self.resumed_at.elapsed();
        self.guest.pause()?;
        let tx_end = self.guest.total_transactions()?;
        let verified = self.guest.verify()?;
        let _ = writeln!(out, "done tx={tx_end}");
        self.guest.shutdown();
        if tx_end <= self.tx_start {
            return Err(RecvError::Resume(format!(
                "the KVM guest's transaction counter did not grow ({} -> {tx_end})",
                self.tx_start
            )));
        }
        Ok(KvmRunOutcome {
            tx_start: self.tx_start,
            tx_end,
            tps: tx_end.saturating_sub(self.tx_start) as f64 / ran.as_secs_f64().max(1e-9),
            verified,
        })
    }
}

impl Dest<'_> {
    /// The `GuestState` arrived: validate it before anything is committed. A refusal is
    /// answered with `CommitReply { state rejected }` (the source is waiting for a verdict).
    pub(super) fn accept_guest_state(
        &mut self,
        state: &GuestState,
        image: &mut PendingImage,
        ours: [u8; 32],
    ) -> Result<(), RecvError> {
        match check_guest_state(self.guest_kind, state, image.memory_mut()) {
            Ok(vm) => {
                if let Some(vm) = &vm {
                    self.stats.settings.kvm_vcpus = Some(vm.vcpus.len());
                    self.stats.settings.kvm_state_bytes = Some(state.blob.len());
                }
                self.kvm_state = vm;
                Ok(())
            }
            Err(e) => {
                let err = RecvError::GuestState(e);
                let _ = self.send(&Message::CommitReply(CommitReply {
                    status: CommitStatus::StateRejected,
                    digest: ours,
                    reason: err.to_string(),
                }));
                Err(err)
            }
        }
    }

    /// After the commit of a KVM guest: resume it if asked, then report `Resumed` (its
    /// instant is the first transaction on the destination: the end of the downtime as
    /// the guest sees it).
    pub(super) fn committed_kvm(&mut self, paused_at_ns: u64) -> Result<DestState, RecvError> {
        let (running, tx, at) = match (self.cfg.resume, self.kvm_state.take()) {
            (true, Some(state)) => {
                let started = match self.kvm_verified.take() {
                    Some(Ok(verified)) => KvmResumed::start(
                        &self.cfg.memory_file,
                        self.stats.guest_bytes,
                        &state,
                        verified,
                    ),
                    _ => Err(RecvError::Resume("no verified KVM image to resume".into())),
                };
                match started {
                    Ok(g) => {
                        println!(
                            "resumed kind=kvm tx={} vcpus={} verify=ok blocks={} written_blocks={}",
                            g.tx_start,
                            state.vcpus.len(),
                            g.verified.blocks,
                            g.verified.written_blocks
                        );
                        self.stats.switchover_ms.kvm_restore = Some(g.restore_ms);
                        self.stats.switchover_ms.kvm_first_tx = Some(g.first_tx_ms);
                        let r = (true, g.tx_start, g.first_tx_at_ns);
                        self.kvm = Some(g);
                        r
                    }
                    Err(e) => {
                        let _ = self.send(&Message::Abort(Abort {
                            code: AbortCode::DestinationError,
                            reason: e.to_string(),
                        }));
                        return Err(e);
                    }
                }
            }
            _ => (false, 0, self.committed_at_ns),
        };
        self.report_resumed(paused_at_ns, at, running, tx);
        if let Some(g) = &self.kvm {
            let samples = g.sample(self.sample_window()).map_err(|e| e.to_string());
            self.send_samples(samples);
        }
        Ok(DestState::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(kind: GuestKind, blob: Vec<u8>) -> GuestState {
        GuestState {
            guest_kind: kind,
            tx_count: 0,
            blob,
        }
    }

    #[test]
    fn kind_must_match_the_handshake() {
        let e = check_guest_state(GuestKind::File, &state(GuestKind::Kvm, vec![]), &[]);
        assert!(matches!(e, Err(GuestStateError::KindMismatch { .. })));
        assert!(matches!(
            check_guest_state(GuestKind::File, &state(GuestKind::File, vec![]), &[]),
            Ok(None)
        ));
    }

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

    #[test]
    fn garbage_kvm_state_is_refused_with_the_state_error() {
        let e = check_guest_state(GuestKind::Kvm, &state(GuestKind::Kvm, vec![7; 100]), &[]);
        assert!(matches!(e, Err(GuestStateError::Invalid(_))), "{e:?}");
    }
}

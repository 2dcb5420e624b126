//! Saved VM/vCPU state and its versioned binary format (see KVM.md, "State
//! format"): capture from a paused vCPU, restore into a fresh one in a fixed
//! order, serialize with magic, version, length-checked sections and a CRC32C.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::guest::kvm::error::{KvmError, Result};

/// Blob magic.
pub const STATE_MAGIC: [u8; 8] = *b"VMSKVMST";
/// Current format version.
pub const STATE_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
const SECTION_HEADER_LEN: usize = 16;
const TRAILER_LEN: usize = 8;
const VM_WIDE: u32 = u32::MAX;
/// Bytes of the legacy KVM_GET_XSAVE area.
pub const XSAVE_LEN: usize = 4096;

/// Section tags of the state format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SectionTag {
    /// VM-wide: vCPU count (u32), reserved (u32), RAM size (u64).
    VmInfo = 1,
    /// VM-wide: `kvm_clock_data` (kvmclock).
    Clock = 2,
    /// `kvm_cpuid_entry2` array.
    Cpuid = 16,
    /// `kvm_regs`.
    Regs = 17,
    /// `kvm_sregs`.
    Sregs = 18,
    /// Legacy 4 KiB `kvm_xsave` area (FPU/SSE/AVX state).
    Xsave = 19,
    /// `kvm_xcrs`.
    Xcrs = 20,
    /// MSRs: (index u32, reserved u32, value u64) records.
    Msrs = 21,
    /// `kvm_lapic_state`.
    Lapic = 22,
    /// `kvm_mp_state`.
    MpState = 23,
    /// `kvm_vcpu_events`.
    Events = 24,
    /// `kvm_debugregs`.
    DebugRegs = 25,
}

const VCPU_TAGS: [SectionTag; 10] = [
    SectionTag::Cpuid,
    SectionTag::Regs,
    SectionTag::Sregs,
    SectionTag::Xsave,
    SectionTag::Xcrs,
    SectionTag::Msrs,
    SectionTag::Lapic,
    SectionTag::MpState,
    SectionTag::Events,
    SectionTag::DebugRegs,
];

impl SectionTag {
    fn from_u32(v: u32) -> Option<Self> {
        [SectionTag::VmInfo, SectionTag::Clock]
            .into_iter()
            .chain(VCPU_TAGS)
            .find(|t| *t as u32 == v)
    }

    /// Fixed payload size, or the record size for arrays.
    fn size(self) -> SectionSize {
        use std::mem::size_of;
        match self {
            SectionTag::VmInfo => SectionSize::Exact(16),
            SectionTag::Clock => SectionSize::Exact(size_of::<kvm_clock_data>()),
            SectionTag::Cpuid => SectionSize::Records(size_of::<kvm_cpuid_entry2>()),
            SectionTag::Regs => SectionSize::Exact(size_of::<kvm_regs>()),
            SectionTag::Sregs => SectionSize::Exact(size_of::<kvm_sregs>()),
            SectionTag::Xsave => SectionSize::Exact(XSAVE_LEN),
            SectionTag::Xcrs => SectionSize::Exact(size_of::<kvm_xcrs>()),
            SectionTag::Msrs => SectionSize::Records(16),
            SectionTag::Lapic => SectionSize::Exact(size_of::<kvm_lapic_state>()),
            SectionTag::MpState => SectionSize::Exact(size_of::<kvm_mp_state>()),
            SectionTag::Events => SectionSize::Exact(size_of::<kvm_vcpu_events>()),
            SectionTag::DebugRegs => SectionSize::Exact(size_of::<kvm_debugregs>()),
        }
    }
}

enum SectionSize {
    Exact(usize),
    Records(usize),
}

/// Why a state blob was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Shorter than header plus trailer.
    #[error("state blob of {0} bytes is too short")]
    TooShort(usize),
    /// Not a vmstream KVM state blob.
    #[error("bad magic: not a vmstream KVM state blob")]
    BadMagic,
    /// Written by an incompatible version.
    #[error("unsupported state format version {0} (this build reads {STATE_VERSION})")]
    UnsupportedVersion(u32),
    /// Header fields are inconsistent.
    #[error("bad header: {0}")]
    BadHeader(&'static str),
    /// Declared total length differs from the blob length (truncated or padded).
    #[error("declared length {declared} but blob has {actual} bytes")]
    LengthMismatch {
        /// From the header.
        declared: u64,
        /// Actual.
        actual: usize,
    },
    /// CRC32C over the blob does not match (corruption).
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// From the trailer.
        stored: u32,
        /// Over the received bytes.
        computed: u32,
    },
    /// A section runs past the end of the blob.
    #[error("section at offset {offset} overruns the blob")]
    SectionOverrun {
        /// Byte offset of the section header.
        offset: usize,
    },
    /// Unknown section tag.
    #[error("unknown section tag {0}")]
    UnknownSection(u32),
    /// A section's length does not fit its type.
    #[error("section {tag:?} has {actual} bytes, expected {expected}")]
    SectionSize {
        /// Section.
        tag: SectionTag,
        /// What the type needs (or the record size).
        expected: usize,
        /// What the blob has.
        actual: usize,
    },
    /// The same section appears twice for one vCPU.
    #[error("duplicate section {tag:?} for vCPU {vcpu}")]
    DuplicateSection {
        /// Section.
        tag: SectionTag,
        /// vCPU index (u32::MAX = VM-wide).
        vcpu: u32,
    },
    /// A required section is absent.
    #[error("missing section {tag:?} for vCPU {vcpu}")]
    MissingSection {
        /// Section.
        tag: SectionTag,
        /// vCPU index (u32::MAX = VM-wide).
        vcpu: u32,
    },
    /// A section names a vCPU beyond the declared count, or a VM-wide section names a vCPU.
    #[error("section {tag:?} names vCPU {vcpu} of {count}")]
    BadVcpuIndex {
        /// Section.
        tag: SectionTag,
        /// The index.
        vcpu: u32,
        /// Declared count.
        count: u32,
    },
    /// The state describes a different RAM size than the memory given.
    #[error("state is for {state} bytes of RAM, memory has {memory}")]
    MemorySizeMismatch {
        /// From the blob.
        state: u64,
        /// Of the memory.
        memory: u64,
    },
}

/// Everything needed to resume one vCPU exactly.
#[derive(Clone, Debug)]
pub struct VcpuState {
    /// CPUID table the vCPU ran with.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// System registers.
    pub sregs: kvm_sregs,
    /// Legacy 4 KiB XSAVE area.
    pub xsave: Vec<u8>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Saved MSRs (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions/interrupts/NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

/// State of a paused VM: kvmclock plus every vCPU. Guest RAM is separate.
#[derive(Clone, Debug)]
pub struct VmState {
    /// Guest RAM size the state belongs to.
    pub memory_size: u64,
    /// kvmclock at pause.
    pub clock: kvm_clock_data,
    /// Per vCPU, by index.
    pub vcpus: Vec<VcpuState>,
}

/// MSRs worth saving for this guest (intersected with what KVM lists).
const MSRS_TO_SAVE: &[u32] = &[
    0x0000_0010, // IA32_TSC
    0x0000_003b, // IA32_TSC_ADJUST
    0x0000_0174, // SYSENTER_CS
    0x0000_0175, // SYSENTER_ESP
    0x0000_0176, // SYSENTER_EIP
    0x0000_01a0, // IA32_MISC_ENABLE
    0x0000_0277, // IA32_PAT
    0x0000_02ff, // MTRR default type
    0x0000_06e0, // TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d00, // kvmclock wall clock
    0x4b56_4d01, // kvmclock system time
    0x4b56_4d02, // async PF
    0x4b56_4d03, // steal time
    0x4b56_4d04, // PV EOI
];

/// The MSR indices this host can save and restore.
pub fn saved_msr_indices(kvm: &Kvm) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(KvmError::ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let available = list.as_slice();
    Ok(MSRS_TO_SAVE
        .iter()
        .copied()
        .filter(|i| available.contains(i))
        .collect())
}

fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
    let mut out = Vec::with_capacity(indices.len());
    // One at a time: KVM stops a batch at the first MSR it refuses, and some
    // listed MSRs are unreadable depending on CPUID; those are skipped.
    for &index in indices {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|_| KvmError::Config("MSR array".into()))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(KvmError::ioctl("KVM_GET_MSRS"))?;
        if n == 1 {
            out.push((index, msrs.as_slice()[0].data));
        }
    }
    Ok(out)
}

/// Captures a paused vCPU's state. Call only after the vCPU's last exit was
/// completed (KVM_RUN with immediate_exit), from the vCPU's own thread.
pub fn capture_vcpu(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmError::ioctl("KVM_GET_CPUID2"))?;
    let xsave = vcpu.get_xsave().map_err(KvmError::ioctl("KVM_GET_XSAVE"))?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        mp_state: vcpu
            .get_mp_state()
            .map_err(KvmError::ioctl("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?,
        xsave: xsave.as_bytes()[..XSAVE_LEN].to_vec(),
        xcrs: vcpu.get_xcrs().map_err(KvmError::ioctl("KVM_GET_XCRS"))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(KvmError::ioctl("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(KvmError::ioctl("KVM_GET_LAPIC"))?,
        msrs: read_msrs(vcpu, msr_indices)?,
        events: vcpu
            .get_vcpu_events()
            .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Loads a saved state into a fresh vCPU, in the documented order:
/// CPUID, MP state, regs, sregs, XSAVE, XCRs, debug regs, LAPIC, MSRs, events.
/// (sregs before MSRs: setting EFER/CR state may reset MSRs; LAPIC before
/// MSRs for TSC_DEADLINE; events last because LAPIC/MSR writes can raise events.)
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<()> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| StateError::SectionSize {
        tag: SectionTag::Cpuid,
        expected: kvm_bindings::KVM_MAX_CPUID_ENTRIES,
        actual: s.cpuid.len(),
    })?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(KvmError::ioctl("KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(KvmError::ioctl("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs)
        .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
    let xsave = kvm_xsave::read_from_bytes(&s.xsave).map_err(|_| StateError::SectionSize {
        tag: SectionTag::Xsave,
        expected: XSAVE_LEN,
        actual: s.xsave.len(),
    })?;
    // SAFETY: `xsave` is a complete 4 KiB legacy area and KVM_SET_XSAVE reads
    // exactly that much (no kvm_xsave2 trailing data is involved).
    unsafe { vcpu.set_xsave(&xsave) }.map_err(KvmError::ioctl("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs)
        .map_err(KvmError::ioctl("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(KvmError::ioctl("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic)
        .map_err(KvmError::ioctl("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| StateError::SectionSize {
        tag: SectionTag::Msrs,
        expected: kvm_bindings::KVM_MAX_MSR_ENTRIES,
        actual: entries.len(),
    })?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(KvmError::ioctl("KVM_SET_MSRS"))?;
    if written != entries.len() {
        return Err(KvmError::VcpuFailed {
            vcpu: usize::MAX,
            reason: format!(
                "KVM_SET_MSRS accepted {written} of {} MSRs (first refused: {:#x})",
                entries.len(),
                entries[written].index
            ),
        });
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(KvmError::ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn pod<T: IntoBytes + Immutable>(v: &T) -> &[u8] {
    v.as_bytes()
}

fn unpod<T: FromBytes>(tag: SectionTag, b: &[u8]) -> std::result::Result<T, StateError> {
    T::read_from_bytes(b).map_err(|_| StateError::SectionSize {
        tag,
        expected: std::mem::size_of::<T>(),
        actual: b.len(),
    })
}

struct Writer {
    buf: Vec<u8>,
    sections: u32,
}

impl Writer {
    fn section(&mut self, tag: SectionTag, vcpu: u32, payload: &[u8]) {
        self.buf.extend_from_slice(&(tag as u32).to_le_bytes());
        self.buf.extend_from_slice(&vcpu.to_le_bytes());
        self.buf
            .extend_from_slice(&(payload.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(self.buf.len().next_multiple_of(8), 0);
        self.sections += 1;
    }
}

impl VmState {
    /// Serializes to the versioned binary format (KVM.md, "State format").
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer {
            buf: vec![0u8; HEADER_LEN],
            sections: 0,
        };
        let mut info = Vec::with_capacity(16);
        info.extend_from_slice(&(self.vcpus.len() as u32).to_le_bytes());
        info.extend_from_slice(&0u32.to_le_bytes());
        info.extend_from_slice(&self.memory_size.to_le_bytes());
        w.section(SectionTag::VmInfo, VM_WIDE, &info);
        w.section(SectionTag::Clock, VM_WIDE, pod(&self.clock));
        for (i, v) in self.vcpus.iter().enumerate() {
            let i = i as u32;
            let cpuid: Vec<u8> = v.cpuid.iter().flat_map(|e| pod(e).to_vec()).collect();
            w.section(SectionTag::Cpuid, i, &cpuid);
            w.section(SectionTag::Regs, i, pod(&v.regs));
            w.section(SectionTag::Sregs, i, pod(&v.sregs));
            w.section(SectionTag::Xsave, i, &v.xsave);
            w.section(SectionTag::Xcrs, i, pod(&v.xcrs));
            let msrs: Vec<u8> = v
                .msrs
                .iter()
                .flat_map(|&(index, value)| {
                    let mut r = [0u8; 16];
                    r[..4].copy_from_slice(&index.to_le_bytes());
                    r[8..].copy_from_slice(&value.to_le_bytes());
                    r
                })
                .collect();
            w.section(SectionTag::Msrs, i, &msrs);
            w.section(SectionTag::Lapic, i, pod(&v.lapic));
            w.section(SectionTag::MpState, i, pod(&v.mp_state));
            w.section(SectionTag::Events, i, pod(&v.events));
            w.section(SectionTag::DebugRegs, i, pod(&v.debugregs));
        }
        let total = w.buf.len() + TRAILER_LEN;
        let sections = w.sections;
        let mut buf = w.buf;
        buf[..8].copy_from_slice(&STATE_MAGIC);
        buf[8..12].copy_from_slice(&STATE_VERSION.to_le_bytes());
        buf[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        buf[16..24].copy_from_slice(&(total as u64).to_le_bytes());
        buf[24..28].copy_from_slice(&sections.to_le_bytes());
        let crc = vmstream_simd::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf
    }

    /// Parses and validates a blob: magic, version, lengths, checksum, every
    /// section's size, and that each vCPU has every section exactly once.
    pub fn from_bytes(blob: &[u8]) -> std::result::Result<Self, StateError> {
        if blob.len() < HEADER_LEN + TRAILER_LEN {
            return Err(StateError::TooShort(blob.len()));
        }
        if blob[..8] != STATE_MAGIC {
            return Err(StateError::BadMagic);
        }
        let u32_at = |o: usize| u32::from_le_bytes(blob[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(blob[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != STATE_VERSION {
            return Err(StateError::UnsupportedVersion(version));
        }
        if u32_at(12) as usize != HEADER_LEN {
            return Err(StateError::BadHeader("header length"));
        }
        let declared = u64_at(16);
        if declared != blob.len() as u64 {
            return Err(StateError::LengthMismatch {
                declared,
                actual: blob.len(),
            });
        }
        let body_end = blob.len() - TRAILER_LEN;
        let stored = u32_at(body_end);
        let computed = vmstream_simd::crc32c(&blob[..body_end]);
        if stored != computed {
            return Err(StateError::ChecksumMismatch { stored, computed });
        }
        let section_count = u32_at(24);

        let mut sections: Vec<(SectionTag, u32, &[u8])> = Vec::new();
        let mut at = HEADER_LEN;
        while at < body_end {
            if body_end - at < SECTION_HEADER_LEN {
                return Err(StateError::SectionOverrun { offset: at });
            }
            let tag_raw = u32_at(at);
            let vcpu = u32_at(at + 4);
            let len = u64_at(at + 8);
            let start = at + SECTION_HEADER_LEN;
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| start.checked_add(l))
                .filter(|&e| e <= body_end)
                .ok_or(StateError::SectionOverrun { offset: at })?;
            let tag = SectionTag::from_u32(tag_raw).ok_or(StateError::UnknownSection(tag_raw))?;
            let payload = &blob[start..end];
            match tag.size() {
                SectionSize::Exact(n) if payload.len() != n => {
                    return Err(StateError::SectionSize {
                        tag,
                        expected: n,
                        actual: payload.len(),
                    })
                }
                SectionSize::Records(n) if !payload.len().is_multiple_of(n) => {
                    return Err(StateError::SectionSize {
                        tag,
                        expected: n,
                        actual: payload.len(),
                    })
                }
                _ => {}
            }
            sections.push((tag, vcpu, payload));
            at = end.next_multiple_of(8);
        }
        if sections.len() as u32 != section_count {
            return Err(StateError::BadHeader("section count"));
        }

        let find = |tag: SectionTag, vcpu: u32| -> std::result::Result<&[u8], StateError> {
            let mut hits = sections.iter().filter(|(t, v, _)| *t == tag && *v == vcpu);
            let first = hits
                .next()
                .ok_or(StateError::MissingSection { tag, vcpu })?;
            if hits.next().is_some() {
                return Err(StateError::DuplicateSection { tag, vcpu });
            }
            Ok(first.2)
        };
        let info = find(SectionTag::VmInfo, VM_WIDE)?;
        let vcpu_count = u32::from_le_bytes(info[..4].try_into().unwrap());
        let memory_size = u64::from_le_bytes(info[8..16].try_into().unwrap());
        for (tag, vcpu, _) in &sections {
            let vm_wide = matches!(tag, SectionTag::VmInfo | SectionTag::Clock);
            if (vm_wide && *vcpu != VM_WIDE) || (!vm_wide && *vcpu >= vcpu_count) {
                return Err(StateError::BadVcpuIndex {
                    tag: *tag,
                    vcpu: *vcpu,
                    count: vcpu_count,
                });
            }
        }
        let clock = unpod(SectionTag::Clock, find(SectionTag::Clock, VM_WIDE)?)?;
        let mut vcpus = Vec::with_capacity(vcpu_count as usize);
        for i in 0..vcpu_count {
            let cpuid_bytes = find(SectionTag::Cpuid, i)?;
            let cpuid = cpuid_bytes
                .chunks_exact(std::mem::size_of::<kvm_cpuid_entry2>())
                .map(|c| unpod(SectionTag::Cpuid, c))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let msrs = find(SectionTag::Msrs, i)?
                .chunks_exact(16)
                .map(|r| {
                    (
                        u32::from_le_bytes(r[..4].try_into().unwrap()),
                        u64::from_le_bytes(r[8..].try_into().unwrap()),
                    )
                })
                .collect();
            vcpus.push(VcpuState {
                cpuid,
                regs: unpod(SectionTag::Regs, find(SectionTag::Regs, i)?)?,
                sregs: unpod(SectionTag::Sregs, find(SectionTag::Sregs, i)?)?,
                xsave: find(SectionTag::Xsave, i)?.to_vec(),
                xcrs: unpod(SectionTag::Xcrs, find(SectionTag::Xcrs, i)?)?,
                msrs,
                lapic: unpod(SectionTag::Lapic, find(SectionTag::Lapic, i)?)?,
                mp_state: unpod(SectionTag::MpState, find(SectionTag::MpState, i)?)?,
                events: unpod(SectionTag::Events, find(SectionTag::Events, i)?)?,
                debugregs: unpod(SectionTag::DebugRegs, find(SectionTag::DebugRegs, i)?)?,
            });
        }
        Ok(VmState {
            memory_size,
            clock,
            vcpus,
        })
    }
}

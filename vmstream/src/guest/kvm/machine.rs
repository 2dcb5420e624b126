//! Building a VM: capabilities for the chosen dirty log, the shadow-page
//! cap, in-kernel LAPIC, the guest RAM memory slot, vCPUs and their dirty
//! rings; plus per-vCPU CPUID and formatting of the filedb image.

use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::guest::kvm::abi::*;
use crate::guest::kvm::error::{KvmError, Result};
use crate::guest::kvm::memory::GuestRam;
use crate::guest::kvm::params::WorkloadConfig;
use crate::guest::kvm::state::saved_msr_indices;
use crate::memory::PAGE_SIZE;
use crate::track::kvm::{DirtyLogMode, DirtyRings, RAM_SLOT};

/// A VM with its memory slot and vCPUs, not yet running.
pub(crate) struct Machine {
    pub(crate) vm: Arc<VmFd>,
    pub(crate) vcpus: Vec<VcpuFd>,
    pub(crate) rings: Option<Arc<DirtyRings>>,
    pub(crate) msr_indices: Vec<u32>,
    pub(crate) kvm: Kvm,
}

/// Creates the VM, registers `ram`, runs `before_vcpus` (system-area writes
/// or kvmclock), then creates the vCPUs and maps their dirty rings.
pub(crate) fn create_machine(
    ram: &GuestRam,
    vcpus: usize,
    dirty_log: Option<DirtyLogMode>,
    ring_entries: u32,
    before_vcpus: impl FnOnce(&VmFd) -> Result<()>,
) -> Result<Machine> {
    if vcpus == 0 || vcpus as u64 > MAX_VCPUS {
        return Err(KvmError::Config(format!(
            "{vcpus} vCPUs: need 1..={MAX_VCPUS}"
        )));
    }
    let kvm = Kvm::new().map_err(KvmError::ioctl("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
    match dirty_log {
        Some(DirtyLogMode::Ring) => {
            if !ring_entries.is_power_of_two() || ring_entries < 8192 {
                return Err(KvmError::Config(format!(
                    "dirty ring of {ring_entries} entries: need a power of two >= 8192"
                )));
            }
            let max = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL as u64);
            let bytes = ring_entries as u64 * 16;
            if max <= 0 {
                return Err(KvmError::MissingCapability(
                    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
                ));
            }
            if bytes > max as u64 {
                return Err(KvmError::Config(format!(
                    "dirty ring of {bytes} bytes exceeds KVM's maximum {max}"
                )));
            }
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                ..Default::default()
            };
            cap.args[0] = bytes;
            vm.enable_cap(&cap)
                .map_err(KvmError::ioctl("enable dirty ring"))?;
        }
        Some(DirtyLogMode::Clear) => {
            if vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as u64) <= 0 {
                return Err(KvmError::MissingCapability(
                    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
                ));
            }
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as u64;
            vm.enable_cap(&cap)
                .map_err(KvmError::ioctl("enable manual dirty log protect"))?;
        }
        Some(DirtyLogMode::Bitmap) | None => {}
    }
    raise_mmu_page_limit(&vm, ram.size())?;
    // The state format stores the legacy 4 KiB XSAVE area; refuse hosts whose
    // XSAVE state is larger (e.g. AMX) instead of truncating it silently.
    let xsave_size = vm.check_extension_raw(kvm_bindings::KVM_CAP_XSAVE2 as u64);
    if xsave_size > crate::guest::kvm::state::XSAVE_LEN as i32 {
        return Err(KvmError::MissingCapability(
            "XSAVE state larger than 4 KiB (KVM_GET_XSAVE2 not supported by this VMM)",
        ));
    }
    // An in-kernel LAPIC so its state can be saved and restored.
    vm.create_irq_chip()
        .map_err(KvmError::ioctl("KVM_CREATE_IRQCHIP"))?;
    let region = kvm_userspace_memory_region {
        slot: RAM_SLOT,
        flags: if dirty_log.is_some() {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_addr(),
    };
    // SAFETY: the region is our shared mapping of `ram`, which outlives the
    // VM (KvmGuest keeps both and drops the VM's threads first).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION"))?;
    before_vcpus(&vm)?;
    let vm = Arc::new(vm);
    let vcpu_fds = (0..vcpus)
        .map(|i| {
            vm.create_vcpu(i as u64)
                .map_err(KvmError::ioctl("KVM_CREATE_VCPU"))
        })
        .collect::<Result<Vec<_>>>()?;
    let rings = match dirty_log {
        Some(DirtyLogMode::Ring) => Some(Arc::new(DirtyRings::map(
            vm.clone(),
            &vcpu_fds,
            ring_entries,
            ram.size(),
        )?)),
        _ => None,
    };
    let msr_indices = saved_msr_indices(&kvm)?;
    Ok(Machine {
        vm,
        vcpus: vcpu_fds,
        rings,
        msr_indices,
        kvm,
    })
}

vmm_sys_util::ioctl_io_nr!(KVM_SET_NR_MMU_PAGES, 0xAE, 0x44);

/// Raises KVM's cap on shadow page tables. With the default cap the shadow
/// MMU used under PVM thrashes once a guest touches more than ~128 MiB
/// (measured: 11 K random stores/s at 256 MiB instead of ~20 M/s); a cap of
/// one per guest page still thrashed at 512 MiB, four per page did not.
/// The cap only bounds allocation; unused shadow pages cost nothing.
fn raise_mmu_page_limit(vm: &VmFd, ram_size: u64) -> Result<()> {
    let pages = (ram_size / PAGE_SIZE as u64 * 4).max(8192);
    // SAFETY: KVM_SET_NR_MMU_PAGES takes the page count by value; the VM fd is valid.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_val(vm, KVM_SET_NR_MMU_PAGES(), pages) };
    if ret < 0 {
        return Err(KvmError::Ioctl {
            op: "KVM_SET_NR_MMU_PAGES",
            source: vmm_sys_util::errno::Error::last(),
        });
    }
    Ok(())
}

/// Formats the file-backed guests' dbsim image (WORKLOADS.md) into RAM at
/// IMAGE_GPA: superblock, ledger, active blocks at version 1.
pub(crate) fn format_image(ram: &GuestRam, w: &WorkloadConfig) -> Result<()> {
    let mut image = vec![0u8; (ram.size() - IMAGE_GPA) as usize];
    let params = crate::guest::file::workload::WorkloadParams {
        active_percent: (w.active_permille / 10).clamp(1, 100) as u8,
        seed: w.seed,
        ..crate::guest::file::workload::WorkloadParams::new(
            crate::guest::file::layout::ImageWorkloadKind::Dbsim,
        )
    };
    crate::guest::file::workload::format(&mut image, &params).map_err(KvmError::ImageFormat)?;
    ram.write(IMAGE_GPA, &image)
}

/// Host-supported CPUID with this vCPU's APIC ID filled in.
pub(crate) fn vcpu_cpuid(kvm: &Kvm, index: usize) -> Result<kvm_bindings::CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmError::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((index as u32) << 24),
            0xb | 0x1f => e.edx = index as u32,
            _ => {}
        }
    }
    Ok(cpuid)
}

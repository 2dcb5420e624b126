//! Long-mode CPL 3 machine setup: GDT, TSS, identity-mapped page tables with
//! 2 MiB pages (user bit set, accessed/dirty preset so the CPU never writes
//! them), the guest program, the parameter block, and initial registers.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::guest::kvm::abi::*;
use crate::guest::kvm::error::{KvmError, Result};
use crate::guest::kvm::memory::GuestRam;
use crate::guest::kvm::params::Params;
use crate::memory::PAGE_SIZE;

// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_HUGE: u64 = 1 << 7;
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_ACCESSED;
const LEAF_FLAGS: u64 = TABLE_FLAGS | PTE_DIRTY | PTE_HUGE;

// Control-register bits.
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// 64-bit user code, DPL 3, accessed.
fn code_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: SEL_USER_CODE as u16,
        type_: 0xb,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    }
}

/// Flat read/write data, DPL 3, accessed.
fn data_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: SEL_USER_DATA as u16,
        type_: 0x3,
        present: 1,
        dpl: 3,
        db: 1,
        s: 1,
        g: 1,
        ..Default::default()
    }
}

/// Busy 64-bit TSS whose limit includes the I/O permission bitmap.
fn tss_segment() -> kvm_segment {
    kvm_segment {
        base: TSS_GPA,
        limit: (TSS_IOMAP_OFFSET + TSS_IOMAP_BYTES) as u32,
        selector: SEL_TSS as u16,
        type_: 0xb,
        present: 1,
        ..Default::default()
    }
}

/// Encodes a code/data descriptor (8 bytes) from a segment.
fn descriptor(s: &kvm_segment) -> u64 {
    let base = s.base;
    let limit = if s.g == 1 { s.limit >> 12 } else { s.limit } as u64;
    let access =
        (s.type_ as u64) | (s.s as u64) << 4 | (s.dpl as u64) << 5 | (s.present as u64) << 7;
    let flags = (s.avl as u64) | (s.l as u64) << 1 | (s.db as u64) << 2 | (s.g as u64) << 3;
    (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | access << 40
        | ((limit >> 16) & 0xf) << 48
        | flags << 52
        | ((base >> 24) & 0xff) << 56
}

/// Writes GDT, TSS, page tables, guest program and parameter block.
pub fn write_system_area(ram: &GuestRam, params: &Params) -> Result<()> {
    // GDT: null, user code, user data, TSS (16-byte system descriptor).
    let tss = tss_segment();
    let tss_low = descriptor(&tss);
    let tss_high = tss.base >> 32;
    let gdt = [
        0,
        descriptor(&code_segment()),
        descriptor(&data_segment()),
        tss_low,
        tss_high,
    ];
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    ram.write(GDT_GPA, &gdt_bytes)?;
    // TSS with an I/O permission bitmap allowing ports 0..0x7ff at CPL 3.
    // PVM runs the guest with hardware IOPL 0 (it drops RFLAGS.IOPL on the
    // first entry), so `in`/`out` fault and KVM's emulator consults this
    // bitmap; a clear bit lets the access through as a KVM_EXIT_IO.
    let mut tss = vec![0u8; (TSS_IOMAP_OFFSET + TSS_IOMAP_BYTES + 1) as usize];
    tss[102..104].copy_from_slice(&(TSS_IOMAP_OFFSET as u16).to_le_bytes());
    *tss.last_mut().unwrap() = 0xff;
    ram.write(TSS_GPA, &tss)?;

    // Identity map of all RAM with 2 MiB pages.
    let gib = ram.size().div_ceil(1 << 30);
    ram.write_u64(PML4_GPA, PDPT_GPA | TABLE_FLAGS)?;
    for g in 0..gib {
        let pd = PD_GPA + g * PAGE_SIZE as u64;
        ram.write_u64(PDPT_GPA + g * 8, pd | TABLE_FLAGS)?;
        let first = g << 30;
        let entries: Vec<u8> = (0..512u64)
            .map(|i| first + (i << 21))
            .take_while(|&addr| addr < ram.size())
            .flat_map(|addr| (addr | LEAF_FLAGS).to_le_bytes())
            .collect();
        ram.write(pd, &entries)?;
    }

    if GUEST_PROGRAM.len() as u64 > CODE_MAX {
        return Err(KvmError::Config("guest program too large".into()));
    }
    ram.write(CODE_GPA, GUEST_PROGRAM)?;
    ram.write(PARAMS_GPA, &params.to_bytes())?;
    Ok(())
}

/// System registers for 64-bit mode at CPL 3, based on the vCPU's defaults.
pub fn initial_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = code_segment();
    let data = data_segment();
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss_segment();
    sregs.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers at entry: rip at the program, rdi = vCPU index, own stack, IOPL 3.
pub fn initial_regs(vcpu: u64) -> kvm_regs {
    kvm_regs {
        rip: CODE_GPA,
        rdi: vcpu,
        rsp: STACK_TOP_GPA - vcpu * STACK_SIZE,
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        ..Default::default()
    }
}

// The system-area regions must not overlap, and the I/O bitmap must cover our ports.
const _: () = {
    assert!(STACK_AREA_GPA >= CODE_GPA + CODE_MAX);
    assert!(TSS_GPA + TSS_IOMAP_OFFSET + TSS_IOMAP_BYTES < PML4_GPA);
    assert!(PD_GPA + PD_MAX_TABLES * PAGE_SIZE as u64 <= PARAMS_GPA);
    assert!(VCPU_AREA_GPA + MAX_VCPUS * VCPU_AREA_STRIDE <= CODE_GPA);
    assert!(PORT_TOUCH_DONE < TSS_IOMAP_BYTES * 8);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_descriptor_encodes_like_the_manual() {
        // Canonical 64-bit code descriptor with DPL 3, accessed: 0x00affb000000ffff.
        assert_eq!(descriptor(&code_segment()), 0x00af_fb00_0000_ffff);
        // Flat 32-bit data, DPL 3, accessed: 0x00cff3000000ffff.
        assert_eq!(descriptor(&data_segment()), 0x00cf_f300_0000_ffff);
    }

    #[test]
    fn stacks_stay_inside_the_stack_area() {
        let last = initial_regs(MAX_VCPUS - 1);
        assert!(last.rsp - STACK_SIZE >= STACK_AREA_GPA);
    }
}

//! Guests a migration moves: process guests on a memory file ([`file`](mod@file)) and KVM guests run
//! by vmstream's own VMM ([`kvm`]), QEMU VMs on a shared RAM file ([`qemu`]), all seen by the source through [`migratable`].

/// Which kind of guest is migrated; its discriminant is its tag on the wire (`Hello`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[repr(u8)]
pub enum GuestKind {
    /// A file-backed guest process (`vmstream guest run`).
    File = 1,
    /// A KVM guest run by vmstream's own VMM ([`kvm`]); its vCPU state travels in
    /// `GuestState`.
    Kvm = 2,
    /// A VM QEMU runs on a shared RAM file (`qemu`): vmstream moves the RAM, QEMU the
    /// devices.
    Qemu = 3,
}

pub mod file;
pub mod kvm;
pub mod migratable;
pub mod qemu;

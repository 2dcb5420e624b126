//! Guests a migration moves: process guests on a memory file ([`file`](mod@file)) and KVM guests run
//! by vmstream's own VMM ([`kvm`]), both seen by the source through [`migratable`].

pub mod file;
pub mod kvm;
pub mod migratable;

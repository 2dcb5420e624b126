//! aarch64 backend: NEON (baseline on every aarch64 CPU).

pub(crate) mod neon;

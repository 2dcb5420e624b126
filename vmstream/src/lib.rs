//! vmstream: pre-copy live migration of guest memory.
//!
//! The pipeline, one top module a stage (see `DESIGN.md`): [`guest`] -> [`track`] ->
//! [`migration`] (encode, transport, decode, commit) with [`converge`] deciding the rounds and
//! [`telemetry`] measuring them; [`cli`] parses arguments and prints.

pub mod cli;
pub mod converge;
pub mod disk;
pub mod guest;
pub mod memory;
pub mod migration;
pub mod signals;
pub mod telemetry;
pub mod track;
pub mod units;

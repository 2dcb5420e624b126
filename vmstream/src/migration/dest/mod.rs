//! The destination side: listening for the source (`listen.rs`), the state machine that
//! receives, verifies and commits the guest's image (`machine.rs`), and the seam to the kind
//! of guest received ([`incoming`]), whose image is mostly verified during the rounds
//! ([`verify`]); a same-host handover's memory comes by descriptor instead (`handover.rs`);
//! with post-copy the guest resumes before its last pages came (`postcopy/`).
//! Its per-page tables are [`lazy_words`]: sized from the guest size the source claims, they
//! cost memory only as pages arrive.

mod audit;
mod disks;
mod handover;
mod hello;
pub mod incoming;
pub mod lazy_words;
mod listen;
mod machine;
mod postcopy;
mod report;
pub mod verify;

pub use incoming::{KvmResumed, KvmRunOutcome, QemuLaunch, QemuResumed, ResumedGuest};
pub use listen::{check_config, listen, listen_addr, listen_endpoint, temp_image_path, Listening};
pub use machine::Received;
pub use report::{receive_migration, receive_on, run_resumed, RecvReport, ResumedRun};

//! Pre-copy live migration of a guest's memory over TCP (see `vmstream/PROTOCOL.md` for
//! the byte tables).
//!
//! Message sequence (source on the left, destination on the right):
//!
//! ```text
//!   Hello { magic, version, guest kind, size, page size, features, codec } ->
//!                                <- HelloReply { accepted | refused + reason }
//!   round 0: Packet* (every page)  ->   codec receiver applies in parallel
//!   RoundEnd { round, records, packets } ->
//!                                <- RoundAck { round, records, packets }   (barrier passed)
//!   round n: Packet* (pages dirtied during round n-1), RoundEnd ->, <- RoundAck
//!   ... until the DowntimePolicy says switch over (or cancel: Abort ->)
//!   [guest paused] final round: Packet*, RoundEnd { FINAL } ->
//!   GuestState { kind, tx count, blob (KVM: vCPU state, validated before the commit) } ->
//!   Digest { memory digest at the pause (digest.rs), paused-at instant } ->
//!                                <- RoundAck (of the final round; the two messages above
//!                                   do not wait for it: a round trip less of pause)
//!                                   recompute digest; equal: fsync + rename temp over PATH
//!                                <- CommitReply { committed | digest mismatch | failed }
//!   [source guest ended]
//!   Handover { when it ended } ->   only now, optionally: resume the guest on PATH (verify
//!                                   first); no Handover: never resumed (no two copies)
//!                                <- Resumed { instant, running, tx count, cpu time }
//!                                   if running: sample its tx counter for up to 2 s
//!                                <- GuestSamples { (instant, tx count)* }
//! ```
//!
//! Either side sends `Abort { code, reason }` when it gives up; before the
//! `CommitReply { committed }` the source then resumes its guest and the destination removes
//! its temporary image, so nothing is ever committed twice or half.
//!
//! With `--auth-key-file` on both sides, every connection first runs a mutual
//! challenge-response over a pre-shared key (see [`connect::auth`]), and every frame after it is
//! sealed with AES-256-GCM (see [`connect::seal`]).
//!
//! With `--channels N` the rounds travel over N connections, bound together by a random
//! migration id in a `ChannelHello`; every round's barrier spans all of them (see
//! [`connect::channels`]).
//!
//! Modules: [`wire`] (typed messages, framing, checksums), [`transport`] (frame reader and
//! writer, rate limit, the sender's link), [`connect`] (authentication, sealed frames,
//! admission, parallel channels), [`source`] (asks [`crate::converge::DowntimePolicy`] after every round) and [`dest`]
//! (the two state machines), [`image`]
//! (temporary image, commit, rollback), [`digest`] (the switchover digest), [`config`] (the
//! settings of both sides), [`error`] (their errors), [`interrupt`] (cancellation), [`fault`]
//! (the faults tests inject).

pub mod config;
pub mod connect;
pub mod dest;
pub mod digest;
pub mod error;
pub mod fault;
pub mod image;
pub mod interrupt;
pub mod source;
pub mod transport;
pub mod wire;

pub use config::{PostcopyMode, RecvConfig, SendConfig};
pub use error::{RecvError, SendError};

//! The source and destination state machines in one process: `dest::receive_on` in a thread,
//! `source::migrate` in the test's, over loopback TCP, with a real guest (a `vmstream guest
//! run` process of the real binary, or a KVM guest in this process). Every transition and
//! every failure edge, with faults injected through the typed plans of
//! `vmstream::migration::fault`: each test checks how both sides ended (by error variant),
//! the source guest's state and the destination's files.

mod commit;
mod harness;
mod kvm;
mod regions;
mod rounds;
mod verify;

//! Hardening against hostile peers and paths (issue 19; `vmstream/SECURITY.md`): a keyless
//! migration only on loopback, the size a `Hello` may claim, and a switchover trickled or
//! withheld. One test crate, `--test hardening`.

mod exposure;
mod hostile_peer;
mod trickle;

//! Connections between the two sides: peer authentication ([`auth`]), sealed frames
//! ([`seal`]), which connections a receiver reads ([`admission`]), parallel channels bound
//! into one migration ([`channels`]) and where a keyless migration is allowed ([`exposure`]).

pub mod admission;
pub mod auth;
pub mod channels;
pub mod exposure;
pub mod seal;

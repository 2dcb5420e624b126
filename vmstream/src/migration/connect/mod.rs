//! Connections between the two sides: peer authentication ([`auth`]), sealed frames
//! ([`seal`]), which connections a receiver reads ([`admission`]) and parallel channels bound
//! into one migration ([`channels`]).

pub mod admission;
pub mod auth;
pub mod channels;
pub mod seal;

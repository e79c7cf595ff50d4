//! omesh-harness: the test harness of omesh-state, a crate of its own (as raft-rs keeps
//! its harness) so every item is used or public, never hidden behind `allow(dead_code)`.
//!
//! - [`fixtures`]: node ids, the authorized submitter, signed specs, configs.
//! - [`mesh`]: a deterministic mesh of replicas on simulated time whose network really
//!   drops, duplicates and reorders, with cuts, crashes and a fake executor.
//! - [`conformance`]: the replica's driver contract as one suite, run by this harness, by
//!   netsim and by the peer's in-process driver.
//!
//! Test code: it panics on misuse rather than returning errors.
#![forbid(unsafe_code)]
#![allow(unreachable_pub)]

pub mod conformance;
pub mod fixtures;
pub mod mesh;

pub use fixtures::{config, node, spec, spec_with, submitter};
pub use mesh::{joined, owner_of, Instance, Mesh, NetStats};

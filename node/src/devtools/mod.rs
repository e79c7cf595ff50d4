//! Developer tools: `omesh demo`, the local mesh of child `omesh up` processes, and the
//! `omesh bench …` commands.
//!
//! Only `main.rs` and the tests (node/tests) import this module; nothing in `peer`, `exec`
//! or `images` may `use crate::devtools`, so the peer never depends on its own test rigs.

pub mod bench;
pub mod bench_blobs;
pub mod bench_offload;
pub mod bench_tasks;
pub mod demo;
pub mod localmesh;

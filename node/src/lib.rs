//! omesh: the peer. Every host of the mesh runs this one binary.
//!
//! This crate owns all I/O of a peer: files, the network (libp2p, quinn), Docker, load
//! sampling, the status API and the CLI. Every protocol decision lives in `omesh-state`;
//! this crate only drives it and carries out what it asks.
//!
//! Modules follow the planes of a peer. `peer`, `exec` and `images` never import `devtools`.

/// The status API (axum): routes, JSON views, and the calls it sends to the peer loop.
pub mod api;
/// The command line: API client and tables, `omesh image …`, submitter key files.
pub mod cli;
/// The node's config file, flags and env, checked once at start-up.
pub mod config;
/// The data directory: identity key, incarnation counter, logs.
pub mod datadir;
/// Developer tools (demo, local mesh, benches); only `main.rs` and tests use them.
pub mod devtools;
/// Executors: run one epoch of a task as a container or a process, with typed errors.
pub mod exec;
/// Images: blob store, QUIC data plane, fetches from peers, `docker save` import.
pub mod images;
/// Load sampling (CPU and memory, smoothed) for the replica.
pub mod load;
/// Prometheus metrics of the peer.
pub mod metrics;
/// The peer's event loop: the libp2p swarm, the replica driver, API calls and task logs.
pub mod peer;

//! omesh: the peer. Every host of the mesh runs this one binary.
//!
//! This crate owns all I/O of a peer: files, the network (libp2p, quinn), Docker, load
//! sampling, the status API and the CLI. Every protocol decision lives in `omesh-state`;
//! this crate only drives it and carries out what it asks.
//!
//! Modules follow the planes of a peer:
//! - [`peer`]: the event loop: libp2p swarm, dialing, API calls, task logs, and the replica
//!   driver (`peer::driver`) that dispatches the replica's actions.
//! - [`exec`]: executors (Docker, process) that run one epoch of a task, with typed errors.
//! - [`images`]: blob store, QUIC data plane, fetches from peers, `docker save` import.
//! - [`admission`]: who may connect (admission certificates, `allowed_peers`), cert files.
//! - [`api`]: the status API (axum): routes, JSON views, calls into the peer loop.
//! - [`dashboard`]: the web page every peer serves at `/` (embedded assets, polls the API).
//! - [`cli`]: clap arguments, the API client and its tables, `omesh image`, submitter keys.
//! - [`config`]: the config file, flags and env, checked once at start-up.
//! - [`datadir`]: the data directory: identity key, incarnation counter, logs.
//! - [`load`]: CPU and memory sampling, smoothed, for the replica.
//! - [`metrics`]: the peer's Prometheus metrics.
//! - [`devtools`]: demo, local mesh, benches. Only `main.rs` and the tests use it; `peer`,
//!   `exec` and `images` never import it.

pub mod admission;
pub mod api;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod datadir;
pub mod devtools;
pub mod exec;
pub mod guard;
pub mod images;
pub mod load;
pub mod metrics;
pub mod peer;
pub mod procfs;

//! omesh: the peer. Every host of the mesh runs this one binary.
//!
//! This crate owns all I/O of a peer: files, the network (libp2p, quinn), Docker, load
//! sampling, the status API and the CLI. Every protocol decision lives in `omesh-state`;
//! this crate only drives it and carries out what it asks.

pub mod api;
pub mod bench;
pub mod bench_blobs;
pub mod bench_tasks;
pub mod blobs;
pub mod client;
pub mod config;
pub mod datadir;
pub mod dataplane;
pub mod demo;
pub mod executor;
pub mod fetch;
pub mod image_cli;
pub mod image_import;
pub mod images;
pub mod keys;
pub mod load;
pub mod localmesh;
pub mod metrics;
pub mod net;
pub mod peer;
pub mod tasks;

//! The command line: the clap arguments of every subcommand, the client of a peer's status
//! API, `omesh image …`, and submitter key files. `main.rs` parses and dispatches.

pub mod args;
pub mod client;
pub mod commands;
pub mod image;
pub mod keys;
pub mod localtime;

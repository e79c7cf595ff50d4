//! The `omesh` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use omesh::keys::{self, KeyFileError, Overwrite, DEFAULT_KEY_FILE};

/// omesh: a masterless, gossip-based offload mesh for edge hosts.
#[derive(Debug, Parser)]
#[command(name = "omesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a submitter key (ed25519) and print its public key, or show an existing one.
    ///
    /// The secret key is written as 64 hex characters to FILE with mode 0600. The public key
    /// printed on stdout is what goes into the mesh's `authorized_submitters`.
    Keygen(KeygenArgs),
}

#[derive(Debug, Args)]
struct KeygenArgs {
    /// Where to write the new secret key.
    #[arg(long, short, value_name = "FILE", default_value = DEFAULT_KEY_FILE)]
    out: PathBuf,
    /// Replace FILE if it already exists (the old key is lost).
    #[arg(long)]
    force: bool,
    /// Print the public key of an existing key file; creates nothing.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["out", "force"])]
    show: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(args) => keygen(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            eprintln!("omesh: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.show {
        let key = keys::read_key_file(path)?;
        println!("{}", keys::public_hex(&key));
        return Ok(());
    }
    let overwrite = if args.force {
        Overwrite::Replace
    } else {
        Overwrite::Refuse
    };
    let key = keys::generate();
    keys::write_key_file(&args.out, &key, overwrite).map_err(|e| match e {
        KeyFileError::Exists { .. } => anyhow::anyhow!("{e}; pass --force to replace it"),
        other => other.into(),
    })?;
    eprintln!("wrote secret key to {} (mode 0600)", args.out.display());
    println!("{}", keys::public_hex(&key));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}

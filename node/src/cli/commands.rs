//! The client subcommands: `submit`, `task`, `cancel`, `logs`, `status`, `peers`, `tasks`
//! and `keygen`. They talk to a local peer's API; errors are `anyhow` at this edge.

use crate::cli::args::{
    AdmitArgs, ApiArgs, CancelArgs, KeygenArgs, LogsArgs, RevokeArgs, SubmitArgs, TaskArgs,
};
use crate::cli::client::{self, Client};
use crate::cli::keys::{self, KeyFileError, Overwrite};

/// A tokio runtime for one command (two workers).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// `omesh submit`.
pub fn submit(args: &SubmitArgs) -> anyhow::Result<()> {
    let executor: omesh_protocol::ExecutorKind = args.executor.parse()?;
    let image = match (&args.image, executor) {
        (Some(image), _) => {
            omesh_protocol::ImageRef::parse(image)?;
            image.clone()
        }
        // A process runs what the owner's host has: nothing to pin.
        (None, omesh_protocol::ExecutorKind::Process) => String::new(),
        (None, _) => anyhow::bail!(
            "--image NAME@sha256:<64 hex> is needed unless the task runs as a process (--executor process)"
        ),
    };
    let key = keys::read_key_file(&args.key)?;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let window = |flag: &str, v: Option<u64>| -> anyhow::Result<Option<u32>> {
        v.map(|ms| {
            u32::try_from(ms).map_err(|_| anyhow::anyhow!("--{flag} of {ms} ms is too long"))
        })
        .transpose()
    };
    let disconnect = omesh_protocol::Disconnect {
        stop_after_ms: window("stop-after", args.stop_after)?,
        lost_after_ms: window("lost-after", args.lost_after)?,
    };
    let spec = omesh_protocol::TaskSpec {
        image,
        command: args.command.clone(),
        env: args.env.iter().cloned().collect(),
        cpu_millis: args.cpu,
        memory_bytes: args.memory,
        required_tags: args.tags.iter().cloned().collect(),
        priority: args.priority,
        max_attempts: args.attempts,
        timeout_ms: args.timeout,
        executor,
        nonce,
        submitter: [0; 32],
        disconnect,
    };
    spec.check_shape()?;
    let signed = spec.sign(&key);
    let body = serde_json::to_value(crate::api::SubmitBody::from_signed(&signed))?;
    let client = Client::new(&args.api);
    let rt = runtime()?;
    let resp: serde_json::Value = rt.block_on(client.send(
        reqwest::Method::POST,
        "/api/v1/tasks",
        args.token.as_deref(),
        Some(&body),
    ))?;
    let id = resp.get("id").and_then(|v| v.as_str()).unwrap_or_default();
    if args.json {
        println!("{resp}");
    } else {
        println!("{id}");
    }
    Ok(())
}

/// `omesh task`.
pub fn show_task(args: &TaskArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.api.api);
    let rt = runtime()?;
    rt.block_on(async {
        let id = client
            .resolve_task(&args.id)
            .await
            .map_err(anyhow::Error::msg)?;
        let t: crate::api::TaskJson = client.get(&format!("/api/v1/tasks/{id}")).await?;
        if args.api.json {
            println!("{}", serde_json::to_string_pretty(&t)?);
        } else {
            print!("{}", client::task_text(&t));
        }
        Ok(())
    })
}

/// `omesh cancel`.
pub fn cancel(args: &CancelArgs) -> anyhow::Result<()> {
    let key = keys::read_key_file(&args.key)?;
    let client = Client::new(&args.api);
    let rt = runtime()?;
    rt.block_on(async {
        let id = client
            .resolve_task(&args.id)
            .await
            .map_err(anyhow::Error::msg)?;
        let task: omesh_protocol::TaskId = id
            .parse()
            .map_err(|_| anyhow::anyhow!("the peer resolved {id:?}, which is not a task id"))?;
        let body = serde_json::to_value(crate::api::CancelBody::sign(&key, task))?;
        let _: serde_json::Value = client
            .send(
                reqwest::Method::DELETE,
                &format!("/api/v1/tasks/{id}"),
                args.token.as_deref(),
                Some(&body),
            )
            .await?;
        println!("cancelled {id}");
        Ok(())
    })
}

/// `omesh logs`.
pub fn logs(args: &LogsArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let client = Client::new(&args.api);
    let rt = runtime()?;
    rt.block_on(async {
        let id = client
            .resolve_task(&args.id)
            .await
            .map_err(anyhow::Error::msg)?;
        let mut offset = 0u64;
        let mut epoch = None;
        loop {
            let chunk: crate::api::LogChunk = client
                .send(
                    reqwest::Method::GET,
                    &format!("/api/v1/tasks/{id}/logs?offset={offset}"),
                    args.token.as_deref(),
                    None,
                )
                .await?;
            if epoch.is_some_and(|e| e != chunk.epoch) {
                // The task moved to a new epoch (failover or retry): start its log from the top.
                eprintln!(
                    "--- epoch {} on {} ---",
                    chunk.epoch,
                    &chunk.owner[..12.min(chunk.owner.len())]
                );
                offset = 0;
                epoch = Some(chunk.epoch);
                continue;
            }
            epoch = Some(chunk.epoch);
            let mut out = std::io::stdout().lock();
            out.write_all(chunk.data.as_bytes())?;
            out.flush()?;
            offset = chunk.next_offset;
            let more_now = chunk.next_offset > chunk.offset;
            let ended = !chunk.running
                && matches!(chunk.state.as_str(), "succeeded" | "failed" | "cancelled");
            if !args.follow || (ended && !more_now) {
                return Ok(());
            }
            if !more_now {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    })
}

/// What `status`, `peers` and `tasks` print.
pub enum Show {
    /// `omesh status`.
    Status,
    /// `omesh peers`.
    Peers,
    /// `omesh tasks`.
    Tasks,
}

/// `omesh status|peers|tasks`.
pub fn api_command(args: &ApiArgs, what: Show) -> anyhow::Result<()> {
    let client = Client::new(&args.api);
    let rt = runtime()?;
    rt.block_on(async move {
        // JSON when asked, else the human text.
        fn render<T: serde::Serialize + ?Sized>(
            json: bool,
            value: &T,
            text: impl FnOnce(&T) -> String,
        ) -> anyhow::Result<String> {
            Ok(if json {
                serde_json::to_string_pretty(value)?
            } else {
                text(value)
            })
        }
        let text = match what {
            Show::Status if args.json => {
                render(true, &client.status().await?, client::status_text)?
            }
            Show::Status => {
                let status = client.status().await?;
                let peers = client.peers().await?;
                let tasks = client.tasks().await?;
                client::mesh_status_text(&status, &peers, &tasks)
            }
            Show::Peers => render(args.json, &client.peers().await?, |p| client::peers_text(p))?,
            Show::Tasks => render(args.json, &client.tasks().await?, |t| client::tasks_text(t))?,
        };
        println!("{}", text.trim_end());
        Ok(())
    })
}

/// `omesh keygen`.
pub fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
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

/// `omesh admit`: signs an admission certificate for one node.
pub fn admit(args: &AdmitArgs) -> anyhow::Result<()> {
    let operator = keys::read_key_file(&args.key)?;
    let now = crate::peer::Clock::new().now();
    let not_after = match args.expires {
        0 => u64::MAX,
        ms => now.saturating_add(ms),
    };
    let tags = args.tags.iter().cloned().collect();
    let (cert, out) = match (&args.peer_id, &args.data_dir) {
        (Some(id), _) => {
            let node = crate::admission::parse_node(id).map_err(anyhow::Error::msg)?;
            let cert = omesh_protocol::AdmissionCert::sign(&operator, node, tags, now, not_after);
            let out = args
                .out
                .clone()
                .unwrap_or_else(|| crate::config::ADMISSION_CERT_FILE.into());
            crate::admission::write_file(&out, &cert)?;
            (cert, out)
        }
        (None, Some(dir)) => {
            let cert = crate::admission::admit_data_dir(
                &operator,
                dir,
                tags,
                now,
                not_after,
                args.out.as_deref(),
            )?;
            let out = args
                .out
                .clone()
                .unwrap_or_else(|| dir.join(crate::config::ADMISSION_CERT_FILE));
            (cert, out)
        }
        (None, None) => anyhow::bail!("name the node to admit: PEER_ID or --data-dir"),
    };
    let peer = crate::peer::net::peer_id_of(&cert.node)
        .map(|p| p.to_string())
        .unwrap_or_default();
    eprintln!(
        "admitted node {} (peer {peer}) until {}; wrote {}",
        cert.node.short(),
        if not_after == u64::MAX {
            "forever".to_owned()
        } else {
            format!("{not_after} ms (Unix)")
        },
        out.display()
    );
    eprintln!(
        "the node needs it at <data_dir>/admission.cert (or --admission-cert), and every node admission_keys = {}",
        keys::public_hex(&operator)
    );
    Ok(())
}

/// `omesh revoke`: signs a revocation of one node.
pub fn revoke(args: &RevokeArgs) -> anyhow::Result<()> {
    let operator = keys::read_key_file(&args.key)?;
    let node = crate::admission::parse_node(&args.peer_id).map_err(anyhow::Error::msg)?;
    let revocation = omesh_protocol::Revocation::sign(&operator, node);
    if let Some(out) = &args.out {
        crate::admission::write_file(out, &revocation)?;
        eprintln!(
            "wrote the revocation of node {} to {}",
            node.short(),
            out.display()
        );
    }
    use omesh_protocol::Wire;
    let encoded = hex::encode(revocation.to_wire()?);
    println!("{encoded}");
    if let Some(api) = &args.api {
        let client = Client::new(api);
        let body = serde_json::to_value(crate::api::RevokeBody {
            revocation: encoded,
        })?;
        let rt = runtime()?;
        let _: serde_json::Value = rt.block_on(client.send(
            reqwest::Method::POST,
            "/api/v1/revocations",
            args.token.as_deref(),
            Some(&body),
        ))?;
        eprintln!("node {} revoked through {api}", node.short());
    }
    Ok(())
}

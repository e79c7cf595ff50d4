//! The CLI side of the status API: fetch JSON from a local peer and print tables.

use serde::de::DeserializeOwned;

use crate::api::{PeerView, StatusView, TaskJson};

/// Why the API could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered.
    #[error("cannot reach the omesh API at {url}: {source} (is `omesh up` running? see --api)")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The API answered with an error.
    #[error("{url} answered {status}: {reason}")]
    Api {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The reason it gave.
        reason: String,
    },
    /// The answer was not what this CLI understands.
    #[error("unexpected answer from {url}: {source}")]
    Decode {
        /// The URL.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
}

/// A client of one peer's API.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    /// A client for `api` (`host:port` or a URL).
    pub fn new(api: &str) -> Self {
        let base = if api.starts_with("http://") || api.starts_with("https://") {
            api.trim_end_matches('/').to_owned()
        } else {
            format!("http://{api}")
        };
        Self {
            base,
            http: reqwest::Client::new(),
        }
    }

    /// GETs `path` and decodes JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            let reason = body
                .get("error")
                .and_then(|v| v.as_str())
                .unwrap_or("no reason given")
                .to_owned();
            return Err(ClientError::Api {
                url,
                status: status.as_u16(),
                reason,
            });
        }
        resp.json()
            .await
            .map_err(|source| ClientError::Decode { url, source })
    }

    /// The peer's status.
    pub async fn status(&self) -> Result<StatusView, ClientError> {
        self.get("/api/v1/status").await
    }

    /// The peers.
    pub async fn peers(&self) -> Result<Vec<PeerView>, ClientError> {
        self.get("/api/v1/peers").await
    }

    /// The tasks.
    pub async fn tasks(&self) -> Result<Vec<TaskJson>, ClientError> {
        self.get("/api/v1/tasks").await
    }
}

/// Renders rows as an aligned table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.clone()));
        out.push('\n');
    }
    out
}

/// The status as text.
pub fn status_text(s: &StatusView) -> String {
    format!(
        "node        {}\npeer        {}\nincarnation {}\nversion     {}\nready       {}\npeers       {} known, {} alive, {} connected\ntasks       {}\ndigest      {}\noverloaded  {}\nlisten      {}\nuptime      {:.1}s\n",
        s.node_id,
        s.peer_id,
        s.incarnation,
        s.version,
        s.ready,
        s.peers_known,
        s.peers_alive,
        s.peers_connected,
        s.tasks,
        s.digest,
        s.overloaded,
        s.listen_addrs.join(" "),
        s.uptime_ms as f64 / 1000.0
    )
}

/// The peers as a table.
pub fn peers_text(peers: &[PeerView]) -> String {
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            vec![
                format!(
                    "{}{}",
                    &p.id[..12.min(p.id.len())],
                    if p.is_self { "*" } else { "" }
                ),
                p.health.clone(),
                format!("{:.0}%", p.cpu_percent),
                format!("{:.0}%", p.mem_percent),
                p.rtt_ms.map_or("-".into(), |r| format!("{r:.1}ms")),
                p.last_heard_ms_ago
                    .map_or("-".into(), |t| format!("{:.1}s", t as f64 / 1000.0)),
                p.incarnation.to_string(),
                p.tags.join(","),
                p.addresses.first().cloned().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "HEALTH", "CPU", "MEM", "RTT", "HEARD", "INC", "TAGS", "ADDRESS",
        ],
        &rows,
    )
}

/// The tasks as a table.
pub fn tasks_text(tasks: &[TaskJson]) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.id[..12.min(t.id.len())].to_owned(),
                format!("{}({})", t.state, t.code),
                t.epoch.to_string(),
                t.owner
                    .as_deref()
                    .map_or("-".into(), |o| o[..12.min(o.len())].to_owned()),
                t.failed_attempts.to_string(),
                t.exit_code.map_or("-".into(), |c| c.to_string()),
                t.command.join(" "),
            ]
        })
        .collect();
    table(
        &["ID", "STATE", "EPOCH", "OWNER", "FAILED", "EXIT", "COMMAND"],
        &rows,
    )
}

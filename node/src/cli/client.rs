//! The CLI side of the status API: fetch JSON from a local peer and print tables.

use serde::de::DeserializeOwned;

use crate::api::{PeerView, StatusView, TaskJson};

/// Why the API could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered.
    #[error("cannot reach the omesh API at {url} (is `omesh up` running? see --api)")]
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
    #[error("unexpected answer from {url}")]
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
        self.send(reqwest::Method::GET, path, None, None).await
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
        "node        {}\npeer        {}\nincarnation {}\nversion     {}\nready       {}\nadmission   {}\npeers       {} known, {} alive, {} connected\ntasks       {}\ndigest      {}\noverloaded  {}\nlisten      {}\nuptime      {:.1}s\n",
        s.node_id,
        s.peer_id,
        s.incarnation,
        s.version,
        s.ready,
        admission_text(s),
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

/// `omesh status`: the mesh on one screen, as the answering node sees it: this node, nodes
/// by health, tasks by state, and whether the peers' state digests agree with this node's.
pub fn mesh_status_text(s: &StatusView, peers: &[PeerView], tasks: &[TaskJson]) -> String {
    let count = |h: &str| peers.iter().filter(|p| p.health == h).count();
    let (alive, suspect, gone) = (count("alive"), count("suspect"), count("gone"));
    let mut by_state: Vec<(&str, usize)> =
        ["pending", "running", "succeeded", "failed", "cancelled"]
            .iter()
            .map(|st| (*st, tasks.iter().filter(|t| t.state == *st).count()))
            .collect();
    for t in tasks {
        if !by_state.iter().any(|(st, _)| *st == t.state) {
            by_state.push((
                t.state.as_str(),
                tasks.iter().filter(|u| u.state == t.state).count(),
            ));
        }
    }
    let tasks_line = by_state
        .iter()
        .map(|(st, n)| format!("{n} {st}"))
        .collect::<Vec<_>>()
        .join(", ");
    // This node agrees with itself; each alive peer by its last sync with this node.
    let others: Vec<&PeerView> = peers
        .iter()
        .filter(|p| !p.is_self && p.health == "alive")
        .collect();
    let agree = 1 + others
        .iter()
        .filter(|p| p.digest_agrees == Some(true))
        .count();
    let differ: Vec<String> = others
        .iter()
        .filter(|p| p.digest_agrees == Some(false))
        .map(|p| p.id[..12.min(p.id.len())].to_owned())
        .collect();
    let unknown = others.iter().filter(|p| p.digest_agrees.is_none()).count();
    let mut digest = format!(
        "{agree} of {} agree ({}…)",
        others.len() + 1,
        &s.digest[..12.min(s.digest.len())]
    );
    if !differ.is_empty() {
        digest.push_str(&format!(
            "; differ at their last sync: {}",
            differ.join(" ")
        ));
    }
    if unknown > 0 {
        digest.push_str(&format!("; {unknown} not compared yet"));
    }
    let me = peers.iter().find(|p| p.is_self);
    let load = me.map_or_else(
        || "-".to_owned(),
        |p| format!("cpu {:.0}%, memory {:.0}%", p.cpu_percent, p.mem_percent),
    );
    format!(
        "node        {} (incarnation {}, omesh {}){}\n\
         peer        {}\n\
         admission   {}\n\
         nodes       {} known: {alive} alive, {suspect} suspect, {gone} gone; {} connected\n\
         tasks       {}: {tasks_line}\n\
         digest      {digest}\n\
         load        {load}{}\n\
         listen      {}\n\
         uptime      {:.1}s\n",
        s.node_id,
        s.incarnation,
        s.version,
        if s.ready { "" } else { " NOT READY" },
        s.peer_id,
        admission_text(s),
        peers.len().max(s.peers_known),
        s.peers_connected,
        tasks.len(),
        if s.overloaded {
            " (over its thresholds: claims nothing new)"
        } else {
            ""
        },
        s.listen_addrs.join(" "),
        s.uptime_ms as f64 / 1000.0
    )
}

fn admission_text(s: &StatusView) -> String {
    if s.admission == "admitted" {
        format!(
            "admitted ({} key{}, {} peer{} verified)",
            s.admission_keys,
            if s.admission_keys == 1 { "" } else { "s" },
            s.admitted_peers,
            if s.admitted_peers == 1 { "" } else { "s" },
        )
    } else {
        "OPEN: no admission keys, any peer that reaches this node joins the mesh".into()
    }
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

/// Parses CPU: `500m` (thousandths), `0.5` or `2` (cores).
pub fn parse_cpu(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a CPU amount (e.g. 500m, 0.5, 2)");
    let millis = if let Some(m) = s.strip_suffix('m') {
        m.parse::<u64>().map_err(|_| bad())?
    } else {
        let cores: f64 = s.parse().map_err(|_| bad())?;
        if !cores.is_finite() || cores < 0.0 {
            return Err(bad());
        }
        (cores * 1000.0).round() as u64
    };
    u32::try_from(millis).map_err(|_| format!("CPU {s:?} is absurd"))
}

/// Parses memory: bytes, or with a suffix `Ki Mi Gi Ti` (1024) or `K M G T` (1000).
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a memory size (e.g. 256Mi, 1Gi, 500M, 1048576)");
    let units: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, mult) in units {
        if let Some(n) = s.strip_suffix(suffix) {
            let n: u64 = n.parse().map_err(|_| bad())?;
            return n
                .checked_mul(mult)
                .ok_or_else(|| format!("memory {s:?} is absurd"));
        }
    }
    s.parse().map_err(|_| bad())
}

/// Parses a duration: `500ms`, `60s`, `5m`, `2h`, or seconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration (e.g. 500ms, 60s, 5m, 2h, 90d)");
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else if let Some(n) = s.strip_suffix('d') {
        (n, 86_400_000)
    } else {
        (s, 1_000)
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

impl Client {
    /// Sends `method path` with an optional JSON body and bearer token; decodes JSON.
    pub async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
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

    /// Resolves a task id or a unique prefix of one.
    pub async fn resolve_task(&self, prefix: &str) -> Result<String, String> {
        if prefix.len() == 64 {
            return Ok(prefix.to_owned());
        }
        if prefix.len() < 4 {
            return Err(format!(
                "task id prefix {prefix:?} is too short (at least 4 characters)"
            ));
        }
        let tasks = self.tasks().await.map_err(|e| e.to_string())?;
        let matches: Vec<&TaskJson> = tasks.iter().filter(|t| t.id.starts_with(prefix)).collect();
        match matches.as_slice() {
            [one] => Ok(one.id.clone()),
            [] => Err(format!("no task id starts with {prefix:?}")),
            _ => Err(format!(
                "{} task ids start with {prefix:?}; give more characters",
                matches.len()
            )),
        }
    }
}

/// A disconnect policy in words: `replace (at least once)`, `stop after 10s (at most once)`.
pub fn disconnect_text(d: &crate::api::DisconnectJson) -> String {
    let mut parts = Vec::new();
    if let Some(ms) = d.stop_after_ms {
        parts.push(format!("stop after {} (at most once)", duration_text(ms)));
    }
    if let Some(ms) = d.lost_after_ms {
        parts.push(format!("lost after {}", duration_text(ms)));
    }
    if parts.is_empty() {
        "replace (at least once)".to_owned()
    } else {
        parts.join(", ")
    }
}

fn duration_text(ms: u32) -> String {
    match ms {
        m if m % 3_600_000 == 0 => format!("{}h", m / 3_600_000),
        m if m % 60_000 == 0 => format!("{}m", m / 60_000),
        m if m % 1_000 == 0 => format!("{}s", m / 1_000),
        m => format!("{m}ms"),
    }
}

/// One task in detail.
pub fn task_text(t: &TaskJson) -> String {
    let mut out = String::new();
    out.push_str(&format!("id          {}\n", t.id));
    out.push_str(&format!("state       {} ({})\n", t.state, t.code));
    out.push_str(&format!("epoch       {}\n", t.epoch));
    out.push_str(&format!(
        "owner       {}\n",
        t.owner.as_deref().unwrap_or("-")
    ));
    out.push_str(&format!("attempts    {} failed\n", t.failed_attempts));
    out.push_str(&format!(
        "exit code   {}\n",
        t.exit_code.map_or("-".into(), |c| c.to_string())
    ));
    if !t.error.is_empty() {
        out.push_str(&format!("error       {}\n", t.error));
    }
    if let Some(r) = &t.pending_reason {
        out.push_str(&format!("pending     {r}\n"));
    }
    if let Some(p) = &t.progress {
        out.push_str(&format!("progress    {p}\n"));
    }
    out.push_str(&format!(
        "image       {}\n",
        t.image.as_deref().unwrap_or("-")
    ));
    out.push_str(&format!("command     {}\n", t.command.join(" ")));
    out.push_str(&format!("disconnect  {}\n", disconnect_text(&t.disconnect)));
    if !t.history.is_empty() {
        // Times are each reporter's clock, shown in this host's zone; offsets count from the
        // first entry, so a timeline reads at a glance (claimed +0.0 s, running +0.3 s, ...).
        let zone = super::localtime::Zone::local();
        let first = t.history.iter().map(|h| h.at_ms).min().unwrap_or(0);
        out.push_str("timeline\n");
        let rows: Vec<Vec<String>> = t
            .history
            .iter()
            .map(|h| {
                let since = i64::try_from(h.at_ms).unwrap_or(i64::MAX)
                    - i64::try_from(first).unwrap_or(i64::MAX);
                vec![
                    h.epoch.to_string(),
                    h.state.clone(),
                    h.exit_code.map_or("-".into(), |c| c.to_string()),
                    h.reporter[..12.min(h.reporter.len())].to_owned(),
                    zone.format_ms(h.at_ms),
                    super::localtime::offset_text(since),
                    h.error.clone(),
                ]
            })
            .collect();
        for line in table(
            &[
                "EPOCH",
                "STATE",
                "EXIT",
                "REPORTER",
                "AT",
                "SINCE_FIRST",
                "ERROR",
            ],
            &rows,
        )
        .lines()
        {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse() {
        assert_eq!(parse_cpu("500m"), Ok(500));
        assert_eq!(parse_cpu("0.25"), Ok(250));
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert!(parse_cpu("-1").is_err());
        assert!(parse_cpu("lots").is_err());
        assert_eq!(parse_memory("256Mi"), Ok(256 << 20));
        assert_eq!(parse_memory("1G"), Ok(1_000_000_000));
        assert_eq!(parse_memory("4096"), Ok(4096));
        assert!(parse_memory("-5Mi").is_err());
        assert!(parse_memory("99999999999999Ti").is_err());
        assert_eq!(parse_duration_ms("60s"), Ok(60_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert!(parse_duration_ms("soon").is_err());
    }
}

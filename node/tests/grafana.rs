//! The Grafana dashboard (deploy/grafana/dashboards/*.json) is proven against real data: a
//! real Prometheus server (Debian's `prometheus`, installed by .ci/run) scrapes a 3-peer mesh
//! every second, and every panel query, with Grafana's variables filled in, must return at
//! least one series (one per peer where it is split by peer). A query that returns nothing
//! would draw "No data" for an operator.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{mesh, wait_until, Submitter};

/// Kills the Prometheus server when the test ends, however it ends.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, targets: &[String]) -> Self {
        let port = common::free_port();
        let quoted: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: omesh\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: [{}]\n",
            quoted.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("prometheus.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    /// `GET /api/v1/query`: the result vector (or matrix) of `expr`, if the query ran.
    async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let resp = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Scrape targets reported healthy.
    async fn targets_up(&self) -> usize {
        let Ok(resp) = reqwest::get(format!("{}/api/v1/targets", self.url)).await else {
            return 0;
        };
        let Ok(body) = resp.json::<serde_json::Value>().await else {
            return 0;
        };
        body["data"]["activeTargets"]
            .as_array()
            .map(|ts| ts.iter().filter(|t| t["health"] == "up").count())
            .unwrap_or(0)
    }
}

/// Every `expr` of every panel (rows' nested panels included), with the panel's title.
fn panel_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((title.clone(), expr.to_owned()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Fills in Grafana's variables as a dashboard showing every peer would: `$instance` (multi
/// value, all selected) becomes an alternation of the targets; `$__rate_interval` becomes
/// four scrape intervals and more, as Grafana computes it for a 1 s scrape.
fn concrete(expr: &str, instances: &[String]) -> String {
    let all = format!("({})", instances.join("|"));
    let mut e = expr
        .replace("$__rate_interval", "10s")
        .replace("${__rate_interval}", "10s")
        .replace("$__interval", "2s")
        .replace("${instance}", &all)
        .replace("$instance", &all)
        .replace("${node}", &all)
        .replace("$node", &all);
    // Any variable this test does not know would make the query silently wrong.
    if let Some(i) = e.find('$') {
        panic!("unknown Grafana variable in {expr:?} at {:?}", &e[i..]);
    }
    e = e.trim().to_owned();
    e
}

/// A result with data: at least one series and, when the series are per peer (they carry an
/// `instance` label), one for every peer, so a panel does not quietly miss a peer.
fn covers(result: &[serde_json::Value], instances: &[String]) -> bool {
    if result.is_empty() {
        return false;
    }
    let per_peer = result.iter().all(|s| s["metric"]["instance"].is_string());
    !per_peer
        || instances
            .iter()
            .all(|i| result.iter().any(|s| s["metric"]["instance"] == i.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grafana_panel_query_returns_series_from_a_real_mesh() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "prometheus is missing in CI; .ci/run should have installed Debian's prometheus package"
        );
        eprintln!("SKIP every_grafana_panel_query_returns_series_from_a_real_mesh: prometheus not installed (apt-get install prometheus)");
        return;
    }
    let dashboards_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/dashboards");
    let mut queries = Vec::new();
    let mut variable_queries = Vec::new();
    for entry in std::fs::read_dir(&dashboards_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let d: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            for (title, expr) in panel_queries(&d) {
                queries.push((format!("{name}: {title}"), expr));
            }
            for v in d["templating"]["list"].as_array().into_iter().flatten() {
                if let Some(q) = v["definition"].as_str() {
                    variable_queries
                        .push((v["name"].as_str().unwrap_or("?").to_owned(), q.to_owned()));
                }
            }
        }
    }
    assert!(
        !queries.is_empty(),
        "no panel queries found in {dashboards_dir:?}"
    );

    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let nodes = mesh(root.path(), 3, |_| sub.flags()).await;
    let instances: Vec<String> = nodes
        .iter()
        .map(|n| {
            n.api()
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_owned()
        })
        .collect();
    let prom_dir = root.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom = Prometheus::start(&prom_dir, &instances);

    let up = wait_until(Duration::from_secs(60), || async {
        prom.targets_up().await == 3
    })
    .await;
    if !up {
        eprintln!("{}", std::fs::read_to_string(&prom.log).unwrap_or_default());
    }
    assert!(up, "prometheus did not scrape all three peers");

    // Activity for the panels about tasks and leases: a task that runs a few seconds.
    let spec = sub.spec(
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do echo tick $i; sleep 1; done",
        ],
        |_| {},
    );
    let id = sub.submit(&nodes[0], &spec).await;
    println!("submitted task {id}");

    // Grafana's variables come from `label_values(metric, label)`: each must list every peer.
    for (name, q) in &variable_queries {
        let inner = q
            .trim()
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {name}: unsupported query {q:?}"));
        let (metric, label) = inner.rsplit_once(',').unwrap();
        let (metric, label) = (metric.trim().to_owned(), label.trim().to_owned());
        let ok = wait_until(Duration::from_secs(30), || async {
            prom.query(&metric).await.is_ok_and(|r| {
                instances
                    .iter()
                    .all(|i| r.iter().any(|s| s["metric"][label.as_str()] == i.as_str()))
            })
        })
        .await;
        assert!(ok, "variable ${name} ({q}) does not list all three peers");
    }

    // Each query must return at least one series; wait, since rates need a few scrapes.
    let mut failures = Vec::new();
    for (panel, expr) in &queries {
        let e = concrete(expr, &instances);
        let last = std::sync::Mutex::new(Err(String::from("not run")));
        let ok = wait_until(Duration::from_secs(45), || async {
            let r = prom.query(&e).await;
            let has = r.as_ref().is_ok_and(|r| covers(r, &instances));
            *last.lock().unwrap() = r;
            has
        })
        .await;
        let last = last.into_inner().unwrap();
        match (&last, ok) {
            (Ok(r), true) => println!("ok   {panel}: {} series  ({e})", r.len()),
            (Ok(_), false) => failures.push(format!("{panel}: no series for {e}")),
            (Err(err), _) => failures.push(format!("{panel}: query failed: {err} ({e})")),
        }
    }
    assert!(
        failures.is_empty(),
        "panel queries without data:\n{}",
        failures.join("\n")
    );
}

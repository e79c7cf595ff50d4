//! deploy/ stays valid: the compose file, the Prometheus config, the Grafana dashboard (every
//! metric it queries exists on a real peer's /metrics), the systemd unit, the DaemonSet and the
//! Dockerfile's pins. Tools that are missing skip their check with a printed reason; in CI
//! (`CI=true`, `OMESH_REQUIRE_DOCKER=1`) they must be there.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{wait_until, Node};

/// The uid of the provisioned Prometheus datasource, which every panel must use.
const DATASOURCE_UID: &str = "omesh-prometheus";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(rel: &str) -> String {
    let path = deploy().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Runs `cmd`; `None` if the program is not installed.
fn run(cmd: &mut Command) -> Option<Output> {
    cmd.stdin(Stdio::null()).output().ok()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `promtool`, or `None` after printing why the check is skipped (a failure in CI).
fn promtool(test: &str) -> Option<()> {
    if run(Command::new("promtool").arg("--version")).is_some_and(|o| o.status.success()) {
        return Some(());
    }
    assert!(
        !in_ci(),
        "{test}: promtool is missing in CI; .ci/run installs Debian's prometheus package"
    );
    eprintln!("SKIP {test}: promtool not installed (apt-get install prometheus)");
    None
}

/// `docker compose` (v2) or `docker-compose` (v1), whichever answers.
fn compose_command() -> Option<Vec<&'static str>> {
    let candidates: [&[&'static str]; 2] = [&["docker", "compose"], &["docker-compose"]];
    candidates.into_iter().find_map(|c| {
        let ok = run(Command::new(c[0]).args(&c[1..]).arg("version"))
            .is_some_and(|o| o.status.success());
        ok.then(|| c.to_vec())
    })
}

#[test]
fn compose_file_validates() {
    let test = "compose_file_validates";
    let Some(compose) = compose_command() else {
        common::docker::skip(
            test,
            "neither `docker compose` nor `docker-compose` is installed",
        );
        return;
    };
    let config = |token: Option<&str>| {
        let mut cmd = Command::new(compose[0]);
        cmd.args(&compose[1..])
            .arg("-f")
            .arg(deploy().join("compose.yaml"))
            .arg("config")
            .env("OMESH_AUTHORIZED_SUBMITTERS", "ab".repeat(32))
            .env("OMESH_ADMISSION_KEYS", "cd".repeat(32))
            .env("DOCKER_GID", "999")
            .env_remove("OMESH_API_TOKEN");
        if let Some(t) = token {
            cmd.env("OMESH_API_TOKEN", t);
        }
        run(&mut cmd).unwrap()
    };
    let out = config(Some("deploy-test-token"));
    let shown = text(&out);
    assert!(out.status.success(), "{compose:?} config refused:\n{shown}");
    for service in [
        "peer1",
        "peer2",
        "peer3",
        "peer4",
        "peer5",
        "prometheus",
        "grafana",
    ] {
        assert!(
            shown.contains(&format!("  {service}:")),
            "no {service}:\n{shown}"
        );
    }
    assert!(
        shown.contains("deploy-test-token"),
        "token not passed:\n{shown}"
    );
    // Without a token the mesh must not start with a default one.
    let out = config(None);
    assert!(
        !out.status.success() && text(&out).contains("OMESH_API_TOKEN"),
        "compose accepted a missing OMESH_API_TOKEN:\n{}",
        text(&out)
    );
    // Every peer requires admission by the operator's key.
    assert!(
        shown.contains(&"cd".repeat(32)),
        "admission keys not passed"
    );
    let raw = read("compose.yaml");
    assert!(raw.contains("OMESH_ADMISSION_KEYS: ${OMESH_ADMISSION_KEYS:?"));
    // peer1 seeds the others at its fixed address.
    let seed_ip = raw
        .split("ipv4_address:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap();
    let seed = format!("OMESH_SEEDS: /ip4/{seed_ip}/udp/7001/quic-v1");
    assert_eq!(raw.matches(&seed).count(), 4, "peers 2-5 must seed {seed}");
    assert_eq!(
        raw.matches("/var/run/docker.sock:/var/run/docker.sock")
            .count(),
        5
    );
}

#[test]
fn prometheus_config_passes_promtool() {
    let test = "prometheus_config_passes_promtool";
    let raw = read("prometheus.yml");
    for i in 1..=5 {
        assert!(
            raw.contains(&format!("- peer{i}:7878")),
            "peer{i} not scraped"
        );
    }
    if promtool(test).is_none() {
        return;
    }
    let out = run(Command::new("promtool")
        .args(["check", "config"])
        .arg(deploy().join("prometheus.yml")))
    .unwrap();
    assert!(
        out.status.success(),
        "promtool check config:\n{}",
        text(&out)
    );
}

/// Metric names a peer serves, from a real scrape (classic text format): sample names, and
/// every name a HELP/TYPE line announces (families without samples yet, histogram parts).
async fn scraped_metric_names() -> BTreeSet<String> {
    let root = tempfile::tempdir().unwrap();
    let sub = common::Submitter::new();
    let mut flags = sub.flags();
    flags.extend(["--alone".into(), "true".into()]);
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = Node::start(root.path(), "scrape", &[], &refs);
    let ready = wait_until(Duration::from_secs(30), || async {
        node.status().await.is_some_and(|s| s.ready)
    })
    .await;
    assert!(ready, "peer did not start:\n{}", node.log());
    let metrics = node.text("/metrics").await.unwrap();
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        } else if !line.starts_with('#') {
            let key = line.split_whitespace().next().unwrap_or("");
            let name = key.split('{').next().unwrap_or("");
            if !name.is_empty() {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// Metric names node/src/metrics.rs registers, as served: `omesh_` prefix, `_total` on
/// counters (and counter families), `_bucket`/`_sum`/`_count` on histograms. A family with no
/// label set yet is not served at all, so a fresh peer's scrape alone misses it.
fn declared_metric_names() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs");
    let src = std::fs::read_to_string(path).unwrap();
    let mut names = BTreeSet::new();
    for call in src.split("registry.register(").skip(1) {
        let call = call.split(");").next().unwrap_or_default();
        let (Some(name), Some(field)) = (
            call.split('"').nth(1),
            call.rsplit("m.").next().and_then(|f| f.split('.').next()),
        ) else {
            continue;
        };
        let decl = format!("pub {field}: ");
        let Some(ty) = src
            .lines()
            .find_map(|l| l.trim().strip_prefix(decl.as_str()))
        else {
            continue;
        };
        let full = format!("omesh_{name}");
        if ty.contains("Histogram") {
            names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{full}{s}")));
        } else if ty.contains("Counter") {
            names.insert(format!("{full}_total"));
        } else {
            names.insert(full);
        }
    }
    names
}

/// Every `omesh_*` identifier in a PromQL expression.
fn omesh_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("omesh_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

/// (panel title, refId, expr) of every target, after checking the schema essentials.
fn dashboard_targets() -> Vec<(String, String, String)> {
    let dash: serde_json::Value = serde_json::from_str(&read("grafana/dashboards/omesh.json"))
        .expect("the dashboard is not JSON");
    assert!(
        dash["title"].as_str().is_some_and(|t| !t.is_empty()),
        "no title"
    );
    assert!(
        dash["uid"].as_str().is_some_and(|t| !t.is_empty()),
        "no uid"
    );
    assert!(dash["schemaVersion"].as_u64().is_some(), "no schemaVersion");
    let panels = dash["panels"].as_array().expect("no panels array");
    assert!(!panels.is_empty(), "no panels");
    let provisioned = read("grafana/provisioning/datasources/prometheus.yaml");
    assert!(provisioned.contains(&format!("uid: {DATASOURCE_UID}")));
    let mut ids = BTreeSet::new();
    let mut all = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default().to_owned();
        assert!(!title.is_empty(), "a panel without a title: {p}");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "{title}: id reused"
        );
        assert!(
            p["type"].as_str().is_some_and(|t| !t.is_empty()),
            "{title}: no type"
        );
        assert_eq!(
            p["datasource"]["uid"], DATASOURCE_UID,
            "{title}: datasource"
        );
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{title}: no gridPos");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.is_empty(), "{title}: a target without expr");
            let ref_id = t["refId"].as_str().expect("refId").to_owned();
            all.push((title.clone(), ref_id, expr.to_owned()));
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_queries_only_metrics_a_peer_serves() {
    let targets = dashboard_targets();
    let served = scraped_metric_names().await;
    assert!(served.contains("omesh_peers_known"), "scrape: {served:?}");
    let declared = declared_metric_names();
    assert!(
        declared.contains("omesh_peers_known"),
        "metrics.rs: {declared:?}"
    );
    let mut used = BTreeSet::new();
    for (title, _, expr) in &targets {
        let names = omesh_names(expr);
        assert!(
            !names.is_empty() || expr.starts_with("up{job=\"omesh\""),
            "{title}: {expr} queries no omesh metric"
        );
        for n in names {
            assert!(
                served.contains(&n) || declared.contains(&n),
                "{title}: {n} is neither served by a peer nor declared in metrics.rs; \
                 served: {served:?}, declared: {declared:?}"
            );
            if !served.contains(&n) {
                println!("{title}: {n} is declared but a fresh peer does not serve it yet");
            }
            used.insert(n);
        }
    }
    // The panels the issue asks for.
    for want in [
        "omesh_peers_known",
        "omesh_peers_alive",
        "omesh_tasks",
        "omesh_failovers_total",
        "omesh_delta_propagation_seconds_bucket",
        "omesh_sync_success_total",
        "omesh_sync_failure_total",
        "omesh_messages_malformed_total",
    ] {
        assert!(used.contains(want), "no panel queries {want}");
    }
    println!(
        "dashboard: {} queries over {} metrics, all real",
        targets.len(),
        used.len()
    );
}

#[test]
fn grafana_dashboard_queries_parse_with_promtool() {
    let test = "grafana_dashboard_queries_parse_with_promtool";
    let targets = dashboard_targets();
    if promtool(test).is_none() {
        return;
    }
    // As recording rules, with Grafana's variables replaced by what they expand to.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, ref_id, expr)) in targets.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        let expr = serde_json::to_string(&expr).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard:q{i}_{ref_id}\n        expr: {expr}\n"
        ));
    }
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(rules.as_bytes()).unwrap();
    let out = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(file.path()))
    .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules:\n{}\n{rules}",
        text(&out)
    );
}

#[test]
fn dockerfile_bases_are_pinned_by_digest() {
    let dockerfile = read("Dockerfile");
    let is_pinned = |image: &str| {
        image.split_once("@sha256:").is_some_and(|(name, hex)| {
            name.contains(':')
                && hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    };
    let mut bases = 0;
    for line in dockerfile.lines().map(str::trim) {
        if let Some(arg) = line.strip_prefix("ARG ") {
            if let Some((name, image)) = arg.split_once('=') {
                if name.ends_with("_IMAGE") {
                    assert!(is_pinned(image), "{name} is not pinned by digest: {image}");
                    bases += 1;
                }
            }
        } else if let Some(from) = line.strip_prefix("FROM ") {
            let image = from.split_whitespace().next().unwrap();
            assert!(
                image.starts_with("${") || is_pinned(image),
                "FROM {image} is not pinned by digest"
            );
        }
    }
    assert_eq!(bases, 2, "expected the builder and runtime bases as ARGs");
    assert!(dockerfile.contains("rust:") && dockerfile.contains("debian:bookworm-slim@"));
    assert!(
        read("README.md").contains("imagetools inspect"),
        "deploy/README.md must say how to refresh the digests"
    );
}

#[test]
fn systemd_unit_is_hardened_and_verifies() {
    let unit = read("omesh.service");
    for directive in [
        "DynamicUser=yes",
        "StateDirectory=omesh",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "SupplementaryGroups=docker",
        "Environment=OMESH_DATA_DIR=%S/omesh",
        "ExecStart=/usr/local/bin/omesh up",
    ] {
        assert!(unit.lines().any(|l| l == directive), "no {directive}");
    }
    if run(Command::new("systemd-analyze").arg("--version")).is_none() {
        eprintln!("SKIP systemd-analyze verify: systemd-analyze not installed");
        return;
    }
    // Verify against the binary under test (the unit's path does not exist here).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("omesh.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/omesh", common::bin())).unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&path)).unwrap();
    let said = text(&out);
    assert!(
        out.status.success() && !said.contains("omesh.service"),
        "systemd-analyze verify:\n{said}"
    );
}

#[test]
fn daemonset_has_host_network_probes_and_the_docker_socket() {
    let ds = read("k8s/daemonset.yaml");
    for needle in [
        "kind: DaemonSet",
        "hostNetwork: true",
        "path: /var/run/docker.sock",
        "mountPath: /var/lib/omesh",
        "name: OMESH_API_LISTEN",
        "name: OMESH_API_TOKEN",
        "OMESH_ADMISSION_KEYS:",
    ] {
        assert!(ds.contains(needle), "no {needle:?}");
    }
    let after = |key: &str| ds.split(key).nth(1).unwrap_or_default().to_owned();
    let readiness = after("readinessProbe:");
    let liveness = after("livenessProbe:");
    assert!(readiness.trim_start().starts_with("httpGet:") && readiness.contains("path: /ready"));
    assert!(liveness.trim_start().starts_with("httpGet:"));
    assert!(
        liveness
            .split("path:")
            .nth(1)
            .is_some_and(|p| p.trim_start().starts_with("/health")),
        "liveness must probe /health"
    );
}

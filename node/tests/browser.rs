//! The dashboard in a real browser: headless Chromium driven over WebDriver (Debian's
//! `chromium` and `chromium-driver`, installed by .ci/run) against a real 3-peer mesh.
//!
//! Without a browser the browser test skips itself with a reason, unless
//! `OMESH_REQUIRE_BROWSER=1` (set by .ci/run in CI), where it fails. Screenshots are left in
//! the target dir (`target/tmp/dashboard-*.png`) as test output.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{dump, mesh, wait_until, Node, Submitter};
use fantoccini::{Client, ClientBuilder, Locator};

/// Every response of the dashboard's assets carries the strict policy and the right type,
/// and the API still answers JSON beside it. Needs no browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_assets_are_served_with_their_types_and_a_strict_csp() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(root.path(), "solo", &[], &["--alone", "true"]);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            node.status().await.is_some()
        })
        .await,
        "the peer did not answer"
    );
    let mut total = 0;
    for (path, content_type, body) in omesh::dashboard::ASSETS {
        let resp = reqwest::get(format!("{}{path}", node.api())).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        assert_eq!(header("content-type"), content_type, "{path}");
        assert_eq!(
            header("content-security-policy"),
            omesh::dashboard::CONTENT_SECURITY_POLICY,
            "{path}"
        );
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("x-frame-options"), "DENY", "{path}");
        let served = resp.bytes().await.unwrap();
        assert_eq!(served.as_ref(), body.as_bytes(), "{path}");
        total += served.len();
    }
    assert!(
        total <= omesh::dashboard::MAX_ASSET_BYTES,
        "dashboard is {total} bytes"
    );
    let csp = omesh::dashboard::CONTENT_SECURITY_POLICY;
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"));
    // The API beside it is untouched.
    assert!(node.status().await.is_some());
}

/// The browser and its driver, or why there are none.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let find = |names: &[&str]| {
        names.iter().find_map(|n| {
            Command::new("sh")
                .args(["-c", &format!("command -v {n}")])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        })
    };
    let chromium = find(&["chromium", "chromium-browser", "google-chrome"])
        .ok_or("chromium not installed (apt-get install chromium chromium-driver)")?;
    let driver = find(&["chromedriver"])
        .ok_or("chromedriver not installed (apt-get install chromium-driver)")?;
    Ok((chromium, driver))
}

/// Kills chromedriver and the browser it started (its own process group) when the test
/// ends, however it ends: a browser left behind by a failed test would run on in CI.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_browser(chromium: &Path, driver: &Path, profile: &Path) -> (Driver, Client) {
    let port = common::free_port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let driver = Driver(child);
    let url = format!("http://127.0.0.1:{port}");
    let up = wait_until(Duration::from_secs(30), || async {
        reqwest::get(format!("{url}/status"))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(up, "chromedriver did not start on port {port}");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            // --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1400,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&url)
        .await
        .unwrap();
    (driver, client)
}

/// Evaluates `script` (a function body that returns a value) in the page.
async fn eval(c: &Client, script: &str) -> serde_json::Value {
    c.execute(script, vec![])
        .await
        .unwrap_or(serde_json::Value::Null)
}

/// Waits until `script` returns true in the page.
async fn wait_page(c: &Client, limit: Duration, script: &str) -> bool {
    wait_until(limit, || async {
        eval(c, script).await == serde_json::Value::Bool(true)
    })
    .await
}

async fn screenshot(c: &Client, name: &str) -> PathBuf {
    let png = c.screenshot().await.unwrap();
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_mesh_live_in_a_real_browser() {
    let (chromium, driver) = match browser() {
        Ok(b) => b,
        Err(why) => {
            assert!(
                std::env::var("OMESH_REQUIRE_BROWSER").as_deref() != Ok("1"),
                "OMESH_REQUIRE_BROWSER=1 but {why}"
            );
            eprintln!("SKIP the_dashboard_shows_the_mesh_live_in_a_real_browser: {why}");
            return;
        }
    };
    let root = tempfile::tempdir().unwrap();
    let sub = Submitter::new();
    let mut nodes = mesh(root.path(), 3, |i| {
        let mut f = sub.flags();
        f.extend(["--tag".into(), format!("zone-{}", i % 2)]);
        // Peer 0 (the page's) is over its cpu threshold: tasks run on peers 1 and 2, so
        // killing a task's owner never takes the page down with it.
        let cpu = [95, 10, 30][i];
        f.extend(["--fake-cpu-percent".into(), cpu.to_string()]);
        f
    })
    .await;
    let profile = root.path().join("chromium-profile");
    let (_driver, c) = start_browser(&chromium, &driver, &profile).await;
    let outcome = run(&c, &sub, &mut nodes).await;
    let _ = c.close().await;
    if let Err(e) = outcome {
        dump(&nodes.iter().collect::<Vec<_>>());
        panic!("{e}");
    }
}

/// The scenario; an `Err` names the first expectation the page did not meet.
async fn run(c: &Client, sub: &Submitter, nodes: &mut [Node]) -> Result<(), String> {
    let long = Duration::from_secs(60);
    c.goto(&format!("{}/", nodes[0].api()))
        .await
        .map_err(|e| e.to_string())?;

    // Three nodes, all alive, and the summary says so.
    if !wait_page(
        c,
        long,
        "return document.querySelectorAll('#nodes tr.node[data-health=alive]').length === 3 \
         && document.getElementById('health-summary').dataset.alive === '3'",
    )
    .await
    {
        return Err("the page did not show three alive nodes".into());
    }
    // The stylesheet was applied under the CSP (the script evidently ran: it drew the rows).
    if eval(
        c,
        "return getComputedStyle(document.querySelector('.badge.h-alive')).backgroundColor",
    )
    .await
        != "rgb(47, 125, 91)"
    {
        return Err("the stylesheet was not applied (blocked by the CSP?)".into());
    }
    // Digests compared at sync exchanges: an idle mesh agrees (and by then the load
    // sparklines have a few samples).
    if !wait_page(
        c,
        Duration::from_secs(30),
        "return document.getElementById('digest-summary').dataset.agreement === 'agree'",
    )
    .await
    {
        let said = eval(
            c,
            "return document.getElementById('digest-summary').textContent",
        )
        .await;
        return Err(format!("the page did not show digest agreement: {said}"));
    }
    screenshot(c, "dashboard-nodes.png").await;

    // The token, typed as an operator would; kept in sessionStorage for this tab.
    let input = c
        .find(Locator::Id("token"))
        .await
        .map_err(|e| e.to_string())?;
    input
        .send_keys(&sub.token)
        .await
        .map_err(|e| e.to_string())?;
    c.find(Locator::Css("#token-form button[type=submit]"))
        .await
        .map_err(|e| e.to_string())?
        .click()
        .await
        .map_err(|e| e.to_string())?;
    if eval(c, "return sessionStorage.getItem('omesh.token')").await != sub.token.as_str() {
        return Err("the token was not kept in sessionStorage".into());
    }

    // A task that prints a line every 0.2 s for about 12 s. Hostile-looking output must stay
    // text: the first line is markup that would run if the page ever parsed it.
    let spec = sub.spec(
        &[
            "sh",
            "-c",
            "echo '<img src=x id=pwned>'; for i in $(seq 1 60); do echo line $i; sleep 0.2; done",
        ],
        |_| {},
    );
    let id = sub.submit(&nodes[1], &spec).await;
    let row = format!("#tasks tr.task[data-id='{id}']");
    if !wait_page(
        c,
        long,
        &format!("return !!document.querySelector(\"{row}\")"),
    )
    .await
    {
        return Err(format!("task {id} did not appear on the page"));
    }
    if !wait_page(
        c,
        long,
        &format!("return document.querySelector(\"{row}\").dataset.state === 'running'"),
    )
    .await
    {
        return Err("the task row never showed running".into());
    }

    // Its page: the log follows the output while the task runs.
    c.find(Locator::Css(&format!("{row} a")))
        .await
        .map_err(|e| e.to_string())?
        .click()
        .await
        .map_err(|e| e.to_string())?;
    let lines =
        "return (document.getElementById('log').textContent.match(/^line \\d+$/gm) || []).length";
    let started = Instant::now();
    let mut first = 0;
    while started.elapsed() < long {
        first = eval(c, lines).await.as_u64().unwrap_or(0);
        if first >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if first < 3 {
        let state = eval(c, "return document.getElementById('log-state').textContent").await;
        return Err(format!("the log view showed no output ({state})"));
    }
    let followed = wait_page(
        c,
        long,
        &format!(
            "return (document.getElementById('log').textContent.match(/^line \\d+$/gm) || []).length > {first} \
             && document.getElementById('log-state').textContent.includes('following')"
        ),
    )
    .await;
    if !followed {
        return Err(format!(
            "the log stopped at {first} lines while the task ran"
        ));
    }
    if !wait_page(
        c,
        long,
        "return document.getElementById('log').textContent.includes('line 60')",
    )
    .await
    {
        return Err("the log never reached the last line".into());
    }
    if eval(c, "return !!document.getElementById('pwned')").await != false {
        return Err("task output was parsed as markup".into());
    }
    if !wait_page(
        c,
        long,
        "return !!document.querySelector('#timeline li[data-state=succeeded]')",
    )
    .await
    {
        return Err("the timeline never showed the epoch succeeded".into());
    }
    screenshot(c, "dashboard-task.png").await;

    // Back on the mesh view (no reload): the row changed state live.
    c.execute("location.hash = '#/'", vec![])
        .await
        .map_err(|e| e.to_string())?;
    if !wait_page(
        c,
        long,
        &format!("return document.querySelector(\"{row}\").dataset.state === 'succeeded'"),
    )
    .await
    {
        return Err("the task row did not turn succeeded".into());
    }

    // A long task on peer 1 or 2 (peer 0 is over its cpu threshold and claims nothing).
    let spec = sub.spec(
        &["sh", "-c", "while true; do echo still here; sleep 1; done"],
        |_| {},
    );
    let long_id = sub.submit(&nodes[0], &spec).await;
    let long_row = format!("#tasks tr.task[data-id='{long_id}']");
    if !wait_page(
        c,
        long,
        &format!("return document.querySelector(\"{long_row}\")?.dataset.state === 'running'"),
    )
    .await
    {
        return Err("the long task never showed running".into());
    }
    let owner = nodes[0]
        .task(&long_id)
        .await
        .and_then(|t| t.owner)
        .ok_or("the long task has no owner")?;
    let mut owner_idx = None;
    for (i, n) in nodes.iter().enumerate() {
        if n.node_id().await == owner {
            owner_idx = Some(i);
        }
    }
    let owner_idx = owner_idx
        .filter(|i| *i != 0)
        .ok_or("the overloaded peer 0 took the task")?;

    // kill -9 its owner: the page turns the peer dead, and the task moves to epoch 2 live.
    nodes[owner_idx].kill9();
    if !wait_page(
        c,
        long,
        &format!(
            "return document.querySelector(\"#nodes tr.node[data-id='{owner}']\").dataset.health === 'dead' \
             && document.getElementById('health-summary').dataset.dead === '1'"
        ),
    )
    .await
    {
        return Err("the killed peer did not turn dead on the page".into());
    }
    screenshot(c, "dashboard-dead-peer.png").await;
    if !wait_page(
        c,
        long,
        &format!(
            "const r = document.querySelector(\"{long_row}\"); \
             return r.dataset.state === 'running' && r.querySelectorAll('.dots span').length === 2"
        ),
    )
    .await
    {
        return Err("the task did not fail over to epoch 2 on the page".into());
    }

    // Its page: two epochs on the timeline; cancel it from the page, signed in the browser.
    c.execute(&format!("location.hash = '#/task/{long_id}'"), vec![])
        .await
        .map_err(|e| e.to_string())?;
    if !wait_page(
        c,
        long,
        "return document.querySelectorAll('#timeline li[data-epoch]').length === 2 \
         && document.getElementById('log').textContent.includes('still here')",
    )
    .await
    {
        return Err("the task page did not show two epochs and the log".into());
    }
    let key = c
        .find(Locator::Id("cancel-key"))
        .await
        .map_err(|e| e.to_string())?;
    key.send_keys(&hex::encode(sub.key.to_bytes()))
        .await
        .map_err(|e| e.to_string())?;
    c.find(Locator::Id("cancel-button"))
        .await
        .map_err(|e| e.to_string())?
        .click()
        .await
        .map_err(|e| e.to_string())?;
    if !wait_page(
        c,
        long,
        "return !!document.querySelector('#task-info .badge.s-499') \
         && !!document.querySelector('#timeline li[data-state=cancelled]')",
    )
    .await
    {
        let said = eval(
            c,
            "return document.getElementById('cancel-state').textContent",
        )
        .await;
        return Err(format!("the cancel from the page did not take: {said}"));
    }
    if eval(c, "return document.getElementById('cancel-key').value").await != "" {
        return Err("the submitter key stayed in the form".into());
    }
    if nodes[0].task(&long_id).await.map(|t| t.state).as_deref() != Some("cancelled") {
        return Err("the API does not say cancelled".into());
    }
    screenshot(c, "dashboard-task-failover.png").await;
    Ok(())
}

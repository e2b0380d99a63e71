//! The review page in a real browser: headless Chromium (Debian's `chromium`) driven through
//! `chromedriver` by fantoccini, against the real daemon and Mosquitto. The live page shows
//! and updates each replay camera; an alert is reviewed with its images; clicks and keys
//! write the labels that `retrain` and `eval` then read, echoed on the retained MQTT state;
//! a write without the token, or from another origin, is refused.
//!
//! `EDGE_INSPECT_SCREENSHOTS=<dir>` keeps a screenshot of each page there (docs/review/).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::Value;

use crate::daemon::{
    Daemon, camera, eval_demo, free_port, http_at_known_port, http_get, repo, retrain_small, rig, wait_for,
    write_config,
};

const TOKEN: &str = "a-test-token-of-32-characters-00";

/// `chromedriver` on a free port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/setup.sh installs it)");
        wait_for(Duration::from_secs(20), "chromedriver listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self { child, port }
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        let args =
            ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1100"];
        caps.insert("goog:chromeOptions".into(), serde_json::json!({ "binary": "/usr/bin/chromium", "args": args }));
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `script` (a function body returning a value) until the value is truthy.
async fn until(browser: &Client, what: &str, script: &str) -> Value {
    let started = Instant::now();
    loop {
        let value = browser.execute(script, vec![]).await.unwrap_or(Value::Null);
        let truthy = match &value {
            Value::Null | Value::Bool(false) => false,
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            _ => true,
        };
        if truthy {
            return value;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "timed out waiting for {what} (last {value})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn screenshot(browser: &Client, name: &str) {
    if let Some(dir) = std::env::var_os("EDGE_INSPECT_SCREENSHOTS") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(Path::new(&dir).join(name), browser.screenshot().await.unwrap()).unwrap();
    }
}

/// A raw `POST path` with `headers`: the status.
fn post(addr: &str, path: &str, headers: &str, body: &str) -> u16 {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let length = body.len();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {length}\r\nConnection: close\r\n\r\n{body}"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The live page: a frame from each camera, then newer ones pushed.
async fn live(browser: &Client, addr: &str) {
    browser.goto(&format!("http://{addr}/")).await.unwrap();
    let loaded = r#"return ["cam0","cam1"].every(c => { const i = document.querySelector(`#tile-${c} img.live`); return i.complete && i.naturalWidth > 0; })"#;
    until(browser, "a frame from each camera on the live page", loaded).await;
    let seq = r#"return Number(document.querySelector('#tile-cam1 [data-field="seq"]').textContent)"#;
    let first = browser.execute(seq, vec![]).await.unwrap().as_u64().unwrap();
    let newer = format!("{seq} > {first}");
    until(browser, "a newer frame pushed to cam1's tile", &newer).await;
    until(
        browser,
        "cam0 reported online",
        r#"return document.querySelector('#tile-cam0 .status').textContent === "online""#,
    )
    .await;
    screenshot(browser, "live.png").await;
}

/// Writes are refused without the token, with a wrong one, and from another origin.
fn refused_writes(addr: &str, store: &Path) {
    let label = r#"{"seq": 1, "verdict": "normal"}"#;
    assert_eq!(post(addr, "/api/cam0/label", "", label), 401, "no token");
    assert_eq!(post(addr, "/api/cam0/label", "X-Edge-Inspect-Token: wrong\r\n", label), 401, "a wrong token");
    let foreign = format!("X-Edge-Inspect-Token: {TOKEN}\r\nOrigin: http://evil.example\r\n");
    assert_eq!(post(addr, "/api/cam0/enabled", &foreign, "OFF"), 403, "another origin");
    let cross = format!("X-Edge-Inspect-Token: {TOKEN}\r\nSec-Fetch-Site: cross-site\r\n");
    assert_eq!(post(addr, "/api/cam0/enabled", &cross, "OFF"), 403, "a cross-site fetch");
    let labels =
        crate::daemon::walk(store).into_iter().filter(|p| p.to_string_lossy().ends_with(".label.json")).count();
    assert_eq!(labels, 0, "no refused write left a label");
}

/// The review page: the first flagged frame with its three images; a click without the
/// token is refused on the page; with it, Not a defect, then `j` `d` for the next.
async fn review(browser: &Client, addr: &str) -> [u64; 2] {
    browser.goto(&format!("http://{addr}/review?camera=cam0")).await.unwrap();
    let images = r#"const imgs = [...document.querySelectorAll('.queue .alert')].slice(0, 2).flatMap(a => [...a.querySelectorAll('img')]); return imgs.length === 6 && imgs.every(i => i.complete && i.naturalWidth > 0)"#;
    until(browser, "two flagged frames with overlay, frame and mask", images).await;
    let event = r#"return [...document.querySelectorAll('table.events tbody tr td:nth-child(2)')].some(td => td.textContent === "cam0")"#;
    assert_eq!(browser.execute(event, vec![]).await.unwrap(), true, "cam0's defect event is listed");
    let seqs = browser
        .execute(
            "return [...document.querySelectorAll('.queue .alert')].slice(0, 2).map(a => Number(a.dataset.seq))",
            vec![],
        )
        .await
        .unwrap();
    let seqs: Vec<u64> = seqs.as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    browser.find(Locator::Css(".queue .alert button.normal")).await.unwrap().click().await.unwrap();
    until(browser, "the refusal shown", r#"return document.getElementById("message").className === "error" && document.getElementById("message").textContent"#).await;
    let state = r#"return document.querySelector('.queue .alert [data-field="label"]').textContent"#;
    assert_eq!(browser.execute(state, vec![]).await.unwrap(), "unlabelled");

    browser.find(Locator::Css("#token")).await.unwrap().send_keys(TOKEN).await.unwrap();
    browser.find(Locator::Css("#token-form button")).await.unwrap().click().await.unwrap();
    browser.find(Locator::Css(".queue .alert button.normal")).await.unwrap().click().await.unwrap();
    until(browser, "the first frame labelled not a defect", &format!("{} === 'not a defect'", state)).await;
    // The keyboard: j to the next frame, d for defect.
    let body = browser.find(Locator::Css("body")).await.unwrap();
    body.send_keys("j").await.unwrap();
    body.send_keys("d").await.unwrap();
    let second =
        r#"return document.querySelectorAll('.queue .alert [data-field="label"]')[1].textContent === 'defect'"#;
    until(browser, "the second frame labelled defect by its key", second).await;
    browser.execute("window.scrollTo(0, 0)", vec![]).await.unwrap();
    screenshot(browser, "review.png").await;
    [seqs[0], seqs[1]]
}

/// The history page plots both cameras.
async fn history(browser: &Client, addr: &str) {
    browser.goto(&format!("http://{addr}/history?minutes=1")).await.unwrap();
    let plotted = r#"const imgs = [...document.querySelectorAll('.history img')]; return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0)"#;
    until(browser, "two score plots", plotted).await;
    screenshot(browser, "history.png").await;
}

/// A control from the page: Disable on cam1 is the `enabled` command, echoed retained.
async fn disable(browser: &Client, addr: &str) {
    browser.goto(&format!("http://{addr}/")).await.unwrap();
    browser.find(Locator::Css(r#"#tile-cam1 [data-command="enabled"]"#)).await.unwrap().click().await.unwrap();
    until(
        browser,
        "cam1 shown disabled",
        r#"return document.querySelector('#tile-cam1 .status').textContent === "disabled""#,
    )
    .await;
}

fn label_file(store: &Path, seq: u64) -> Value {
    let suffix = format!("-{seq:06}.label.json");
    let file =
        crate::daemon::walk(store).into_iter().find(|p| p.to_string_lossy().ends_with(&suffix)).expect("a label file");
    serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
}

#[test]
fn the_review_page_in_a_browser_shows_cameras_and_writes_labels_that_retrain_reads() {
    let (broker, sub, dir) = rig();
    let scratch = repo().join("data/brick/test/scratch").display().to_string();
    let good = repo().join("data/brick/test/good").display().to_string();
    let cameras = camera("cam0", &scratch, 4.0, true, "") + &camera("cam1", &good, 4.0, true, "");
    let config = write_config(dir.path(), broker.port, "max_batch = 2\nmax_wait_ms = 20", &cameras);
    let addr = http_at_known_port(&config);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("[http]\n", &format!("[http]\ntoken = \"{TOKEN}\"\n"))).unwrap();
    let store = dir.path().join("state/captures");
    let mut daemon = Daemon::start(&config);
    wait_for(Duration::from_secs(90), "the model loaded", || {
        http_get(&addr, "/healthz").is_some_and(|(s, _)| s == 200)
    });
    let flagged = store.join("cam0/flagged");
    wait_for(Duration::from_secs(60), "two alerts of cam0 recorded", || {
        crate::daemon::walk_if_any(&flagged).iter().filter(|p| p.extension().is_some_and(|e| e == "json")).count() >= 2
    });
    refused_writes(&addr, &store);

    let driver = Driver::start();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let seqs = runtime.block_on(async {
        let browser = driver.browser().await;
        live(&browser, &addr).await;
        let seqs = review(&browser, &addr).await;
        history(&browser, &addr).await;
        disable(&browser, &addr).await;
        browser.close().await.unwrap();
        seqs
    });
    // The labels are the MQTT command's: same files, same retained state.
    assert_eq!(label_file(&store, seqs[0])["verdict"], "normal");
    assert_eq!(label_file(&store, seqs[0])["source"], "web");
    assert_eq!(label_file(&store, seqs[1])["verdict"], "defect");
    wait_for(Duration::from_secs(10), "the label and enabled states retained", || {
        sub.texts("cam0/label/state").len() == 2 && sub.texts("cam1/enabled/state").last().is_some_and(|s| s == "OFF")
    });
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(30)).success(), "{}", daemon.log_text());

    // retrain leaves the frame labelled defect out; eval scores the two labelled frames.
    let report = retrain_small(store.to_str().unwrap(), &dir.path().join("retrained"), &[], &[]).1;
    assert_eq!(report["data"]["labelled_defect_excluded"], 1, "{}", report["data"]);
    let report = eval_demo(&store, &dir.path().join("eval"));
    assert_eq!(report["overall"]["images"].as_u64(), Some(2), "{}", report["overall"]);
    drop(broker);
}

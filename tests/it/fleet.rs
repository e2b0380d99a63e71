//! A plant of three nodes: three daemons (replay cameras) on two Mosquitto brokers bridged
//! together, recording into one S3-compatible bucket (moto's server). What they uploaded —
//! also across a storage outage — trains a bundle away from them (`retrain --data s3://…
//! --publish`); `edge-inspect fleet rollout` takes it to a canary, then to every node (whose
//! downloads fail while their link to the store is cut, and are tried again), each swapping
//! with no frame lost; a bundle that alerts on everything is rolled back by its
//! canary, whose halt stops the rollout everywhere.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::daemon::{
    Broker, Daemon, Subscriber, camera, copy_bundle, free_port, gated_proxy, judged, mqtt_send, repo, retrain_small,
    wait_for, wait_for_or, write_config_for,
};
use crate::upload::{S3, captured_ms};

const NODES: [&str; 3] = ["line1", "line2", "line3"];

/// The AWS variables for the bucket's trainer and operator.
fn aws(s3: &S3, cache: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", s3.port)),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "trainer".into()),
        ("AWS_SECRET_ACCESS_KEY", "not-a-real-secret".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("EDGE_INSPECT_CACHE", cache.display().to_string()),
    ]
}

/// `edge-inspect fleet <args>` against broker `port`.
fn fleet(args: &[&str], port: u16, env: &[(&'static str, String)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edge-inspect"));
    command.arg("fleet").args(args);
    if args[0] != "publish" {
        command.args(["--port", &port.to_string()]);
    }
    command.envs(env.iter().map(|(k, v)| (k, v))).output().unwrap()
}

/// A node's config: its own state, the first bundle, uploads and the fleet on; the store
/// at port `s3`.
fn node_config(dir: &Path, node: &str, broker: u16, s3: u16, first: &Path) -> PathBuf {
    let models = dir.join("models");
    copy_bundle(first, &models.join("brick-1"));
    let frames = repo().join("data/brick/test/good").display().to_string();
    let config = write_config_for(
        &models.join("brick-1"),
        "",
        dir,
        broker,
        "max_batch = 1\nmax_wait_ms = 10\nqueue_capacity = 64",
        &camera("cam0", &frames, 4.0, true, ""),
    );
    let extra = format!(
        "[upload]\nenabled = true\nendpoint = \"http://127.0.0.1:{s3}\"\nbucket = \"recordings\"\nprefix = \"plant-a\"\n\
         access_key_id = \"{node}\"\nsecret_access_key = \"not-a-real-secret\"\n\n\
         [fleet]\nenabled = true\nwatch_s = 4\nretry_s = 2\nmin_frames = 8\nmax_alert_ratio = 1.5\nmin_alert_fraction = 0.5\n\n\
         [[cameras]]"
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text
        .replace("id = \"test\"", &format!("id = \"{node}\""))
        .replace("normal_sample_rate = 1.0", "normal_sample_rate = 0.5");
    std::fs::write(&config, text.replacen("[[cameras]]", &extra, 1)).unwrap();
    config
}

fn json(sub: &Subscriber, topic: &str) -> Option<serde_json::Value> {
    sub.on(topic).last().map(|m| serde_json::from_slice(&m.payload).unwrap())
}

/// The bundle's identity a node reports on `<node>/model`.
fn running(sub: &Subscriber, node: &str) -> Option<String> {
    json(sub, &format!("edge-inspect/{node}/model")).and_then(|m| m["bundle_sha256"].as_str().map(str::to_string))
}

/// Waits up to `secs` for `node` to report `status` for bundle `sha`; on a timeout, says
/// what the node reported instead.
fn wait_rollout(sub: &Subscriber, node: &str, status: &str, sha: &str, secs: u64) {
    let want = Some((status.to_string(), sha.to_string()));
    wait_for_or(
        Duration::from_secs(secs),
        || rollout_status(sub, node) == want,
        || {
            format!(
                "{node} not {status} after {secs} s; it reported {:?}",
                json(sub, &format!("edge-inspect/{node}/rollout"))
            )
        },
    );
}

fn rollout_status(sub: &Subscriber, node: &str) -> Option<(String, String)> {
    let state = json(sub, &format!("edge-inspect/{node}/rollout"))?;
    Some((state["status"].as_str()?.to_string(), state["sha256"].as_str()?.to_string()))
}

/// `fleet publish` of `bundle`: the folder's URL.
fn publish(bundle: &Path, env: &[(&'static str, String)]) -> String {
    let o = fleet(&["publish", bundle.to_str().unwrap(), "--to", "s3://recordings/models"], 0, env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8(o.stdout).unwrap();
    stdout.strip_prefix("published ").and_then(|l| l.split_whitespace().next()).unwrap().to_string()
}

fn rollout(url: &str, nodes: &str, port: u16, env: &[(&'static str, String)]) -> Output {
    fleet(&["rollout", url, "--nodes", nodes], port, env)
}

#[test]
fn a_plant_uploads_trains_away_from_the_line_and_rolls_models_out_with_canaries() {
    let work = tempfile::tempdir().unwrap();
    let s3_port = free_port();
    let mut s3 = S3::start(s3_port);
    let a = Broker::start();
    let a_port = a.port;
    let b = Broker::start_with(|port, _| {
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\n\
             connection plant\naddress 127.0.0.1:{a_port}\ntopic # both 1\n"
        )
    });
    let sub = Subscriber::start(a.port);
    // The nodes reach the store through a link the test can cut.
    let link = Arc::new(AtomicBool::new(true));
    let store_for_nodes = gated_proxy(s3_port, Duration::ZERO, link.clone());
    // The first bundle, trained on the line's own frames: every node starts on it.
    let first = work.path().join("first/brick");
    retrain_small(repo().join("data/brick").to_str().unwrap(), &first, &["--name", "brick", "--version", "1"], &[]);
    let first_sha = bundle_sha_of(&first);
    let dirs: Vec<tempfile::TempDir> = NODES.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    let brokers = [a.port, b.port, b.port];
    let mut daemons: Vec<Daemon> = NODES
        .iter()
        .zip(&dirs)
        .zip(brokers)
        .map(|((node, dir), port)| Daemon::start(&node_config(dir.path(), node, port, store_for_nodes, &first)))
        .collect();
    let started = std::time::Instant::now();
    let uploaded = |s3: &S3, node: &str, after: u128| {
        s3.keys(&format!("plant-a/{node}/cam0/")).iter().any(|k| k.ends_with(".png") && captured_ms(k) > after)
    };
    wait_for(Duration::from_secs(120), "recordings of every node in the bucket", || {
        NODES.iter().all(|n| uploaded(&s3, n, 0))
    });
    assert!(NODES.iter().all(|n| running(&sub, n) == Some(first_sha.clone())), "every node reports the first bundle");

    // A storage outage: inspection goes on; what was recorded meanwhile arrives after it.
    drop(s3);
    let outage = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
    let judged_then = judged(&sub, "line2/cam0").len();
    wait_for(Duration::from_secs(30), "inspection during the outage", || {
        judged(&sub, "line2/cam0").len() > judged_then + 4
    });
    s3 = S3::start(s3_port);
    wait_for(Duration::from_secs(120), "every node's recordings from the outage", || {
        NODES.iter().all(|n| uploaded(&s3, n, outage))
    });
    wait_for(Duration::from_secs(60), "enough recordings to train on", || {
        NODES.iter().map(|n| s3.keys(&format!("plant-a/{n}/cam0/")).len()).sum::<usize>() >= 24
    });

    simulation_sizes(&sub, &s3, started.elapsed());

    // Trained away from the line, on what the nodes uploaded; published with its sums.
    let env = aws(&s3, &work.path().join("cache"));
    let second = work.path().join("second/brick");
    let (stdout, _) = retrain_small(
        "s3://recordings/plant-a",
        &second,
        &["--name", "brick", "--version", "2", "--publish", "s3://recordings/models", "--calibration-fraction", "0.3"],
        &env,
    );
    let url = stdout.lines().find_map(|l| l.strip_prefix("published ")).unwrap().to_string();
    let second_sha = bundle_sha_of(&second);

    // A canary: line1 only, on broker A; the others (on B, across the bridge) stay.
    let o = rollout(&url, "line1", a.port, &env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_rollout(&sub, "line1", "running", &second_sha, 60);
    for node in ["line2", "line3"] {
        wait_for(Duration::from_secs(10), "the others not targeted", || {
            rollout_status(&sub, node).is_some_and(|(status, _)| status == "not_targeted")
        });
        assert_eq!(running(&sub, node), Some(first_sha.clone()), "{node} stays on the first bundle");
    }
    // Everyone, while the nodes cannot reach the store: each says so and tries again every
    // retry_s, on the model it has, until the link is back.
    link.store(false, SeqCst);
    let o = rollout(&url, "all", b.port, &env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for node in ["line2", "line3"] {
        wait_rollout(&sub, node, "failed", &second_sha, 30);
        assert_eq!(running(&sub, node), Some(first_sha.clone()), "{node} inspects on with the first bundle");
    }
    link.store(true, SeqCst);
    wait_for(Duration::from_secs(60), "every node on the new bundle", || {
        NODES.iter().all(|n| running(&sub, n) == Some(second_sha.clone()))
            && NODES.iter().all(|n| rollout_status(&sub, n).is_some_and(|(s, _)| s == "running"))
    });
    let fleet_view = fleet(&["status", "--listen-s", "3", "--json"], b.port, &[]);
    let view = String::from_utf8(fleet_view.stdout).unwrap();
    for node in NODES {
        let line = view.lines().find(|l| l.contains(&format!("\"node\":\"{node}\""))).expect(&view);
        assert!(line.contains("\"status\":\"running\"") && line.contains("\"version\":\"2\""), "{line}");
    }

    // A bundle that alerts on every frame: its canary rolls back and halts the rollout.
    let bad = work.path().join("bad/brick");
    copy_bundle(&second, &bad);
    let manifest = std::fs::read_to_string(bad.join("manifest.toml")).unwrap();
    let manifest = manifest.replace("version = \"2\"", "version = \"3\"");
    let (head, tail) = manifest.split_once("[thresholds.image]\nvalue = ").unwrap();
    let rest = tail.split_once('\n').unwrap().1;
    std::fs::write(bad.join("manifest.toml"), format!("{head}[thresholds.image]\nvalue = 1e-12\n{rest}")).unwrap();
    let bad_url = publish(&bad, &env);
    let bad_sha = bundle_sha_of(&bad);
    let o = rollout(&bad_url, "line2", a.port, &env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_rollout(&sub, "line2", "rolled_back", &bad_sha, 60);
    assert_eq!(running(&sub, "line2"), Some(second_sha.clone()), "line2 is back on the good bundle");
    // The halt is published right after the rolled_back report: wait for it, not just look.
    let halt_topic = format!("edge-inspect/fleet/halt/{bad_sha}");
    wait_for(Duration::from_secs(10), "the halt", || json(&sub, &halt_topic).is_some());
    let halt = json(&sub, &halt_topic).expect("a halt");
    assert_eq!(halt["node"], "line2");
    assert!(halt["reason"].as_str().unwrap().contains("frames alerting"), "{halt}");
    let refused = rollout(&bad_url, "all", b.port, &env);
    assert!(!refused.status.success(), "widening a halted rollout is refused");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("halted"));
    // Published anyway (by hand): the nodes see the halt and stay.
    let message = json(&sub, "edge-inspect/fleet/model").unwrap();
    let mut everyone = message.clone();
    everyone["nodes"] = "all".into();
    mqtt_send(a.port, "edge-inspect/fleet/model", &everyone.to_string());
    wait_for(Duration::from_secs(30), "the others refusing the halted bundle", || {
        ["line1", "line3"].iter().all(|n| rollout_status(&sub, n) == Some(("halted".into(), bad_sha.clone())))
    });
    assert!(NODES.iter().all(|n| running(&sub, n) == Some(second_sha.clone())));

    for daemon in &mut daemons {
        daemon.signal("TERM");
        assert!(daemon.wait_exit(Duration::from_secs(30)).success(), "{}", daemon.log_text());
    }
    // No inspection gap: every node's frames numbered without a hole across its swaps.
    for node in NODES {
        let seqs: Vec<u64> = judged(&sub, &format!("{node}/cam0")).iter().map(|(seq, _)| *seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{node}: {seqs:?}");
        let stats = json(&sub, &format!("edge-inspect/{node}/stats")).unwrap();
        let drops = &stats["cameras"]["cam0"]["drops"];
        assert!(drops.as_object().is_some_and(|d| d.is_empty()), "{node}: no drops: {stats}");
    }
    drop(b);
}

/// Prints what the simulation's nodes sent so far: per node MQTT messages and bytes per
/// second, and per recording the bytes uploaded (the figures in docs/deploy.md's fleet
/// section come from here: `cargo test --test it fleet -- --nocapture`).
fn simulation_sizes(sub: &Subscriber, s3: &S3, elapsed: Duration) {
    for node in NODES {
        let (messages, bytes) = sub.traffic(&format!("edge-inspect/{node}/"));
        let frames = judged(sub, &format!("{node}/cam0")).len();
        let alerts = sub.on(&format!("{node}/cam0/anomaly")).len();
        let (objects, stored) = s3.usage(&format!("plant-a/{node}/"));
        let secs = elapsed.as_secs_f64();
        eprintln!(
            "fleet simulation: {node}: {frames} frames ({alerts} alerts) in {secs:.0} s; MQTT {:.1} messages/s, {:.0} B/s \
             ({:.0} B per frame); object storage {objects} objects, {stored} B ({:.0} B per frame)",
            messages as f64 / secs,
            bytes as f64 / secs,
            bytes as f64 / frames.max(1) as f64,
            stored as f64 / frames.max(1) as f64,
        );
        assert!(messages > frames && stored > 0, "{node}: every frame reports and recordings arrive");
    }
}

/// sha256 of a bundle's manifest (its identity in a rollout).
fn bundle_sha_of(bundle: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(bundle.join("manifest.toml")).unwrap();
    sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

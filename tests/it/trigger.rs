//! Triggered capture against the real daemon and Mosquitto: each `<camera>/trigger` gets
//! exactly one `<camera>/verdict` with its part id; a trigger whose frame never comes gets
//! `missed`; a free-running camera refuses triggers.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use crate::daemon::{Daemon, camera, mqtt_send, repo, rig, wait_for, write_config};

fn json(payload: &[u8]) -> serde_json::Value {
    serde_json::from_slice(payload).unwrap()
}

#[test]
fn each_mqtt_trigger_gets_one_verdict_with_its_part_id_and_a_frameless_trigger_is_missed() {
    let (broker, sub, dir) = rig();
    // "line" replays the sample frames, one per trigger; "dark" reads a FIFO that never
    // delivers; "free" is free-running (and disabled: it only has to refuse a trigger).
    let frames = repo().join("data/brick/test/*/*.png").display().to_string();
    let dark = dir.path().join("dark");
    std::fs::create_dir(&dark).unwrap();
    assert!(Command::new("mkfifo").arg(dark.join("000.png")).status().unwrap().success());
    let triggered =
        "trigger = \"mqtt\"\ntrigger_timeout_ms = 1000\nverdict_timeout_ms = 120000\nstall_timeout_ms = 600000";
    let cameras = camera("line", &frames, 5.0, true, triggered)
        + &camera("dark", &dark.display().to_string(), 5.0, true, triggered)
        + &camera("free", &frames, 5.0, true, "enabled = false");
    // Three triggers come at once: a queue of four holds their frames while the worker is busy.
    let config = write_config(dir.path(), broker.port, "max_batch = 2\nmax_wait_ms = 20\nqueue_capacity = 4", &cameras);
    let mut daemon = Daemon::start(&config);
    let base = "edge-inspect/test";
    // The command path is live once a refusal comes back: a free camera takes no trigger.
    wait_for(Duration::from_secs(60), "the refusal of a trigger to a free-running camera", || {
        mqtt_send(broker.port, &format!("{base}/free/trigger"), "F-1");
        sub.texts("test/error").iter().any(|e| e.contains("free-running"))
    });

    mqtt_send(broker.port, &format!("{base}/line/trigger"), "P-1");
    mqtt_send(broker.port, &format!("{base}/line/trigger"), r#"{"part_id": "P-2"}"#);
    let empty = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1", "-n"])
        .args(["-t", &format!("{base}/line/trigger")])
        .status()
        .unwrap();
    assert!(empty.success());
    mqtt_send(broker.port, &format!("{base}/dark/trigger"), "D-1");
    wait_for(Duration::from_secs(180), "three verdicts on line, one on dark", || {
        sub.on("line/verdict").len() >= 3 && !sub.on("dark/verdict").is_empty()
    });

    let missed = json(&sub.on("dark/verdict")[0].payload);
    assert_eq!((missed["part_id"].as_str(), missed["verdict"].as_str()), (Some("D-1"), Some("missed")), "{missed}");
    assert!(missed["reason"].as_str().unwrap().starts_with("no frame within 1000 ms"), "{missed}");
    let latency = missed["latency_ms"].as_f64().unwrap();
    assert!((1000.0..5000.0).contains(&latency), "answered within a turn of its deadline: {missed}");

    let verdicts: BTreeMap<String, serde_json::Value> = sub
        .on("line/verdict")
        .iter()
        .map(|m| json(&m.payload))
        .map(|v| (v["part_id"].as_str().unwrap().to_string(), v))
        .collect();
    let ids: Vec<&str> = verdicts.keys().map(String::as_str).collect();
    // An empty trigger is named after the camera and its trigger count (the third trigger).
    assert_eq!(ids, ["P-1", "P-2", "line-3"], "{verdicts:#?}");
    let mut seqs: Vec<u64> = verdicts.values().map(|v| v["seq"].as_u64().unwrap()).collect();
    seqs.sort();
    assert_eq!(seqs, [1, 2, 3], "one frame per trigger, numbered without gaps: {verdicts:#?}");
    for (id, v) in &verdicts {
        let kind = v["verdict"].as_str().unwrap();
        assert!(kind == "pass" || kind == "fail", "{v}");
        assert_eq!(kind == "fail", v["normalised_score"].as_f64().unwrap() >= 0.5, "{v}");
        assert_eq!(v["model"]["name"], "brick-huber");
        if kind == "fail" {
            let alerts = sub.on("line/anomaly");
            assert!(alerts.iter().any(|a| json(&a.payload)["part_id"] == id.as_str()), "no alert for {id}");
        }
    }
    let state = json(&sub.on("line/state").last().unwrap().payload);
    assert!(verdicts.contains_key(state["part_id"].as_str().unwrap()), "{state}");

    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(15)).success(), "{}", daemon.log_text());
    wait_for(Duration::from_secs(5), "available = offline", || {
        sub.texts("/available").last().map(String::as_str) == Some("offline")
    });
    // Exactly one verdict per trigger: nothing more came before the daemon went offline.
    assert_eq!(sub.on("line/verdict").len(), 3);
    assert_eq!(sub.on("dark/verdict").len(), 1);
}

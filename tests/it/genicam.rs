//! GenICam cameras against a real GigE Vision camera: Aravis' `arv-fake-gv-camera-0.8`
//! (Debian's aravis-tools) on loopback, started and killed by PID. The daemon opens it with
//! `source = "genicam"`, fires its software trigger once per `<camera>/trigger`, answers each
//! part on `<camera>/verdict`, and after the camera is killed and started again reopens it
//! with backoff, without leaking the threads of the lost connection.

use std::process::{Child, Command};
use std::time::Duration;

use crate::daemon::{Daemon, mqtt_send, rig, stat, wait_for, write_config};

/// The fake camera serves the one loopback address: the tests take turns.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct FakeCamera(Child);

impl FakeCamera {
    fn start() -> Self {
        let child = Command::new("arv-fake-gv-camera-0.8")
            .args(["-i", "127.0.0.1", "-s", "EI-LINE"])
            .spawn()
            .expect("arv-fake-gv-camera-0.8 (scripts/setup.sh installs aravis-tools)");
        Self(child)
    }
}

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Drop for FakeCamera {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count()
}

fn verdicts(sub: &crate::daemon::Subscriber) -> Vec<serde_json::Value> {
    sub.on("gige/verdict").iter().map(|m| serde_json::from_slice(&m.payload).unwrap()).collect()
}

#[test]
fn a_software_triggered_gige_camera_answers_each_part_and_is_reopened_after_it_restarts() {
    let _turn = turn();
    let (broker, sub, dir) = rig();
    let mut camera = FakeCamera::start();
    let table = "[[cameras]]\nid = \"gige\"\nsource = \"genicam\"\ndevice = \"127.0.0.1\"\n\
                 pixel_format = \"Mono8\"\nregion = [0, 0, 128, 128]\nexposure_us = 2000.0\n\
                 features = { GevSCPSPacketSize = 1400 }\n\
                 trigger = \"mqtt\"\ntrigger_source = \"Software\"\ntrigger_timeout_ms = 20000\n\
                 backoff_initial_ms = 200\nbackoff_max_ms = 1000\nstall_timeout_ms = 3000\n";
    // check-config asks the reachable camera: a feature it lacks exits 78 naming it.
    let wrong = dir.path().join("wrong");
    std::fs::create_dir(&wrong).unwrap();
    let bad_table = table.replace("GevSCPSPacketSize = 1400", "GevSCPSPacketSize = 1400, NoSuchFeature = 1");
    let bad = write_config(&wrong, broker.port, "", &bad_table);
    let check = |config: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_edge-inspect"))
            .arg("check-config")
            .arg("--config")
            .arg(config)
            .output()
            .unwrap()
    };
    // The fake camera answers once it listens: until then the check is offline only.
    let mut said = String::new();
    wait_for(Duration::from_secs(20), "check-config to reach the camera", || {
        let refused = check(&bad);
        said = String::from_utf8_lossy(&refused.stderr).to_string() + &String::from_utf8_lossy(&refused.stdout);
        refused.status.code() == Some(78)
    });
    assert!(said.contains("features.NoSuchFeature: the camera has no such feature"), "{said}");
    let config = write_config(dir.path(), broker.port, "max_batch = 2\nmax_wait_ms = 20", table);
    let accepted = check(&config);
    assert!(accepted.status.success(), "{}", String::from_utf8_lossy(&accepted.stderr));
    assert!(String::from_utf8_lossy(&accepted.stdout).contains("camera 'gige': checked against the camera"));
    let mut daemon = Daemon::start(&config);
    let trigger = |part: &str| mqtt_send(broker.port, "edge-inspect/test/gige/trigger", part);
    // The command path is live once a refusal comes back.
    wait_for(Duration::from_secs(60), "the refusal of a trigger to an unknown camera", || {
        mqtt_send(broker.port, "edge-inspect/test/nosuch/trigger", "X");
        sub.texts("test/error").iter().any(|e| e.contains("unknown camera"))
    });
    trigger("G-1");
    wait_for(Duration::from_secs(120), "the verdict on G-1", || !verdicts(&sub).is_empty());
    trigger("G-2");
    wait_for(Duration::from_secs(60), "the verdict on G-2", || verdicts(&sub).len() >= 2);
    let steady = threads(daemon.pid());
    let answered = verdicts(&sub);
    let ids: Vec<&str> = answered.iter().map(|v| v["part_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["G-1", "G-2"], "{answered:#?}");
    for v in &answered {
        assert!(v["verdict"] == "pass" || v["verdict"] == "fail", "{v}");
    }

    // The camera goes away and comes back: the next trigger finds the lost connection,
    // the source is reopened with backoff, and the part is inspected on the new one.
    drop(camera);
    camera = FakeCamera::start();
    trigger("G-3");
    wait_for(Duration::from_secs(60), "the verdict on G-3", || verdicts(&sub).len() >= 3);
    let third = &verdicts(&sub)[2];
    assert_eq!(third["part_id"], "G-3");
    assert!(third["verdict"] == "pass" || third["verdict"] == "fail", "{third}\n{}", daemon.log_text());
    wait_for(Duration::from_secs(10), "the reopen counted", || {
        sub.last_stats().is_some_and(|s| stat(&s, "gige", "reopens") >= 1)
    });
    assert!(threads(daemon.pid()) <= steady, "threads: {} after the reopen, {steady} before", threads(daemon.pid()));
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(15)).success(), "{}", daemon.log_text());
    drop(camera);
}

/// A camera triggered by the line (`trigger = "camera"`): every frame it delivers is a part,
/// named by the camera's frame counter and carrying the camera's timestamp. The fake camera
/// cannot be wired to a line, so it runs free at 4 frames/s: each frame stands for a pulse.
#[test]
fn a_line_triggered_gige_camera_answers_every_frame_by_its_frame_counter() {
    let _turn = turn();
    let (broker, sub, dir) = rig();
    let _camera = FakeCamera::start();
    let table = "[[cameras]]\nid = \"gige\"\nsource = \"genicam\"\ndevice = \"127.0.0.1\"\n\
                 pixel_format = \"Mono8\"\nregion = [0, 0, 64, 64]\nfps = 4.0\ntrigger = \"camera\"\n\
                 verdict_timeout_ms = 60000\nbackoff_initial_ms = 200\nstall_timeout_ms = 3000\n";
    let config = write_config(dir.path(), broker.port, "max_batch = 2\nmax_wait_ms = 20", table);
    let mut daemon = Daemon::start(&config);
    wait_for(Duration::from_secs(120), "three verdicts", || verdicts(&sub).len() >= 3);
    let answered = verdicts(&sub);
    let ids: Vec<u64> = answered.iter().map(|v| v["part_id"].as_str().unwrap().parse().unwrap()).collect();
    let stamps: Vec<u64> = answered.iter().map(|v| v["camera_timestamp_ns"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[1] > w[0]), "part ids from the frame counter: {answered:#?}");
    assert!(stamps.windows(2).all(|w| w[1] > w[0]), "the camera's clock: {answered:#?}");
    for v in &answered {
        assert!(v["verdict"] == "pass" || v["verdict"] == "fail", "{v}");
    }
    let state: serde_json::Value = serde_json::from_slice(&sub.on("gige/state").last().unwrap().payload).unwrap();
    assert!(state["part_id"].is_string() && state["camera_timestamp_ns"].is_u64(), "{state}");
    // The line triggers this camera: an MQTT trigger is refused, by name.
    mqtt_send(broker.port, "edge-inspect/test/gige/trigger", "X-1");
    wait_for(Duration::from_secs(30), "the refusal", || {
        sub.texts("test/error").iter().any(|e| e.contains("triggered by the line"))
    });
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(15)).success(), "{}", daemon.log_text());
}

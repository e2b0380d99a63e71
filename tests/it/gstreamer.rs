//! GStreamer sources against a real RTSP server: gst-rtsp-server (`tests/rtsp-server.py`,
//! Debian's python3-gi) streams a brick frame with a pasted scratch as H.264, behind basic
//! authentication; the daemon reads it with `source = "gstreamer"` and the password from a
//! systemd credential, alerts on the defect, and reconnects with backoff after the server is
//! killed and started again.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use crate::daemon::{Daemon, free_port, repo, rig, stat, wait_for, write_config};

/// The RTSP server as a child process, killed by PID when dropped.
struct RtspServer {
    child: Child,
    _stdout: BufReader<ChildStdout>,
}

impl RtspServer {
    /// Serves each `(name, frame)` at `rtsp://127.0.0.1:port/name`; returns once it listens.
    fn start(port: u16, mounts: &[(&str, &Path)], auth: &str) -> Self {
        let mut command = Command::new("/usr/bin/python3");
        command.arg(repo().join("tests/rtsp-server.py")).arg(port.to_string());
        for (name, frame) in mounts {
            command.arg(format!("{name}={}", frame.display()));
        }
        let mut child = command
            .args(["--auth", auth])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3-gi and gir1.2-gst-rtsp-server-1.0 (scripts/setup.sh installs them)");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the RTSP server did not start");
        Self { child, _stdout: stdout }
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_rtsp_camera_with_a_pasted_defect_alerts_and_reconnects_after_the_server_restarts() {
    let (broker, sub, dir) = rig();
    let port = free_port();
    let frame = repo().join("data/brick/test/scratch/000.png");
    let password = "rtsp-S3cret-9f2";
    let auth = format!("inspector:{password}");
    let mut server = RtspServer::start(port, &[("line", &frame)], &auth);
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("rtsp-password"), password).unwrap();
    let camera = format!(
        "[[cameras]]\nid = \"rtsp\"\nsource = \"gstreamer\"\nuri = \"rtsp://127.0.0.1:{port}/line\"\n\
         username = \"inspector\"\npassword_credential = \"rtsp-password\"\n\
         backoff_initial_ms = 200\nbackoff_max_ms = 1000\nstall_timeout_ms = 5000\n"
    );
    let config = write_config(dir.path(), broker.port, "max_batch = 4\nmax_wait_ms = 50", &camera);
    let mut daemon = Daemon::start_with_env(&config, &[("CREDENTIALS_DIRECTORY", credentials.to_str().unwrap())]);
    wait_for(Duration::from_secs(120), "an alert from the RTSP camera", || !sub.on("rtsp/anomaly").is_empty());
    let alert: serde_json::Value = serde_json::from_slice(&sub.on("rtsp/anomaly")[0].payload).unwrap();
    assert!(alert["normalised_score"].as_f64().unwrap() >= 0.5, "{alert}");
    let (w, h) = image::image_dimensions(&frame).unwrap();
    assert_eq!(alert["inspected"], serde_json::json!([0, 0, w, h]), "the stream's own size: {alert}");

    // The server goes away: the camera goes offline, and is reopened once it is back.
    wait_for(Duration::from_secs(10), "a stats message", || sub.last_stats().is_some());
    let before = sub.last_stats().unwrap();
    drop(server);
    let status = |s: &str| sub.texts("rtsp/status").last().is_some_and(|last| last == s);
    wait_for(Duration::from_secs(20), "the camera offline", || status("offline"));
    server = RtspServer::start(port, &[("line", &frame)], &auth);
    let went_offline = sub.texts("rtsp/status").len();
    // `online` is only published for a frame: a frame of the new connection came.
    wait_for(Duration::from_secs(60), "a frame again after a reopen", || {
        sub.texts("rtsp/status")[went_offline..].iter().any(|s| s == "online")
    });
    wait_for(Duration::from_secs(10), "the reopen counted", || {
        sub.last_stats().is_some_and(|now| stat(&now, "rtsp", "reopens") > stat(&before, "rtsp", "reopens"))
    });
    daemon.signal("TERM");
    let exit = daemon.wait_exit(Duration::from_secs(15));
    assert!(exit.success(), "{exit:?}\n{}", daemon.log_text());
    assert!(!daemon.log_text().contains(password), "the password is in the log");
    drop(server);
}

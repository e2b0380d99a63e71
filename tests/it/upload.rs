//! Recordings to object storage: the daemon's uploader against a real S3-compatible server
//! (moto's, from the pinned wheels `scripts/setup.sh` installs), started by the test and
//! stopped by PID. Recordings arrive under `<prefix>/<node>/<camera>/<day>/<class>/`; when
//! the server is down, inspection goes on, failures are counted, and what was recorded
//! meanwhile arrives once it is back.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::daemon::{
    Daemon, camera, free_port, http_at_known_port, http_get, repo, retrain_small, rig, wait_for, write_config,
};

/// moto's S3 server on `port`, killed on drop.
pub(crate) struct S3 {
    child: Child,
    pub(crate) port: u16,
}

impl S3 {
    pub(crate) fn start(port: u16) -> Self {
        let server = std::env::var("EDGE_INSPECT_MOTO_SERVER")
            .expect("EDGE_INSPECT_MOTO_SERVER (eval \"$(scripts/setup.sh)\" installs moto's server)");
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(Duration::from_secs(30), "the S3 server listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let s3 = Self { child, port };
        assert_eq!(s3.request("PUT", "/recordings").0, 200, "the bucket is created");
        s3
    }

    /// An unsigned request (moto takes them): status and body.
    fn request(&self, method: &str, path: &str) -> (u16, String) {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }

    /// An object, read as the trainer would (signed, through `object_store`).
    fn get_signed(&self, key: &str) -> String {
        use object_store::ObjectStore;
        let client = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(format!("http://127.0.0.1:{}", self.port))
            .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
            .with_bucket_name("recordings")
            .with_region("us-east-1")
            .with_access_key_id("trainer")
            .with_secret_access_key("not-a-real-secret")
            .build()
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let bytes = runtime.block_on(async {
            client.get(&object_store::path::Path::parse(key).unwrap()).await.unwrap().bytes().await.unwrap()
        });
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// The bucket's keys under `prefix`.
    /// The number and total size of the objects under `prefix` (up to 1000 of them).
    pub(crate) fn usage(&self, prefix: &str) -> (usize, u64) {
        let (status, body) = self.request("GET", &format!("/recordings?list-type=2&max-keys=1000&prefix={prefix}"));
        assert_eq!(status, 200, "{body}");
        let sizes = body.split("<Size>").skip(1).filter_map(|s| s.split_once("</Size>")?.0.parse::<u64>().ok());
        sizes.fold((0, 0), |(n, total), size| (n + 1, total + size))
    }

    pub(crate) fn keys(&self, prefix: &str) -> Vec<String> {
        let (status, body) = self.request("GET", &format!("/recordings?list-type=2&max-keys=1000&prefix={prefix}"));
        assert_eq!(status, 200, "{body}");
        body.split("<Key>").skip(1).filter_map(|k| k.split_once("</Key>").map(|(key, _)| key.to_string())).collect()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The capture time (ms) in a key's file name.
pub(crate) fn captured_ms(key: &str) -> u128 {
    key.rsplit('/').next().and_then(|f| f.split_once('-')).and_then(|(ms, _)| ms.parse().ok()).unwrap_or(0)
}

fn metric(addr: &str, name: &str) -> f64 {
    let Some((200, body)) = http_get(addr, "/metrics") else { return 0.0 };
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

#[test]
fn recordings_go_to_object_storage_and_an_outage_loses_none() {
    let (_broker, _sub, dir) = rig();
    let port = free_port();
    let s3 = S3::start(port);
    let scratch = repo().join("data/brick/test/scratch").display().to_string();
    let config = write_config(dir.path(), _broker.port, "max_batch = 1", &camera("cam0", &scratch, 4.0, true, ""));
    let addr = http_at_known_port(&config);
    std::fs::write(dir.path().join("secret"), "not-a-real-secret\n").unwrap();
    let upload = format!(
        "[upload]\nenabled = true\nendpoint = \"http://127.0.0.1:{port}\"\nbucket = \"recordings\"\nprefix = \"plant-a\"\n\
         access_key_id = \"line3\"\nsecret_access_key_file = \"{}\"\n\n[[cameras]]",
        dir.path().join("secret").display()
    );
    let text = std::fs::read_to_string(&config).unwrap().replacen("[[cameras]]", &upload, 1);
    std::fs::write(&config, text).unwrap();
    let mut daemon = Daemon::start(&config);
    // `plant-a/<node>/<camera>/<YYYY-MM-DD>/flagged/<file>`.
    let flagged = |s3: &S3| -> Vec<String> {
        let keys = s3.keys("plant-a/test/cam0/");
        let shaped = |k: &String| {
            let parts: Vec<&str> = k.split('/').collect();
            parts.len() == 6 && parts[3].len() == 10 && parts[3].as_bytes()[4] == b'-' && parts[4] == "flagged"
        };
        keys.into_iter().filter(shaped).collect()
    };
    wait_for(Duration::from_secs(90), "a flagged frame, its mask and sidecar in the bucket", || {
        let keys = flagged(&s3);
        ["png", "_mask.png", "json"].iter().all(|ext| keys.iter().any(|k| k.ends_with(ext)))
    });

    // The server goes away: uploads fail and are counted; inspection goes on.
    drop(s3);
    let outage = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
    let processed = metric(&addr, "edge_inspect_frames_processed_total{camera=\"cam0\"}");
    wait_for(Duration::from_secs(60), "failed uploads counted while frames are inspected", || {
        metric(&addr, "edge_inspect_upload_failures_total") > 0.0
            && metric(&addr, "edge_inspect_frames_processed_total{camera=\"cam0\"}") > processed + 2.0
    });
    // Back (empty: moto keeps nothing): what was recorded during the outage arrives.
    let s3 = S3::start(port);
    wait_for(Duration::from_secs(120), "frames recorded during the outage in the bucket", || {
        flagged(&s3).iter().any(|k| captured_ms(k) > outage)
    });
    assert!(metric(&addr, "edge_inspect_upload_files_total") >= 3.0);
    let frames = |s3: &S3| flagged(s3).iter().filter(|k| k.ends_with("0.png") || k.ends_with("1.png")).count();
    wait_for(Duration::from_secs(60), "enough frames in the bucket to train on", || frames(&s3) >= 6);
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(30)).success(), "{}", daemon.log_text());
    let ledger: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state/upload-ledger.json")).unwrap()).unwrap();
    assert!(ledger.as_object().unwrap().keys().any(|k| k.starts_with("cam0/flagged/")), "{ledger}");
    assert!(Path::new(&dir.path().join("state/captures")).is_dir());
    retrain_from_the_bucket(&s3, dir.path());
}

/// `retrain --data s3://…` trains on what the nodes uploaded, away from them, and
/// `--publish` puts the bundle under `models/<name>/<version>/` with its sha256.
fn retrain_from_the_bucket(s3: &S3, dir: &Path) {
    let out = dir.join("retrained");
    let env = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", s3.port)),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "trainer".into()),
        ("AWS_SECRET_ACCESS_KEY", "not-a-real-secret".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("EDGE_INSPECT_CACHE", dir.join("cache").display().to_string()),
    ];
    let (stdout, report) =
        retrain_small("s3://recordings/plant-a", &out, &["--publish", "s3://recordings/models"], &env);
    assert_eq!(report["data"]["layout"], "captures", "{}", report["data"]);
    assert!(dir.join("cache/recordings/plant-a/test.cam0/flagged").is_dir(), "mirrored as a capture store");
    let published =
        stdout.lines().find_map(|l| l.strip_prefix("published s3://recordings/")).expect("published").to_string();
    let keys = s3.keys(&published);
    assert!(keys.iter().any(|k| k.ends_with("/manifest.toml")), "{keys:?}");
    let sums = s3.get_signed(&format!("{published}SHA256SUMS"));
    use sha2::Digest;
    let manifest = std::fs::read(out.join("manifest.toml")).unwrap();
    let sha: String = sha2::Sha256::digest(&manifest).iter().map(|b| format!("{b:02x}")).collect();
    assert!(sums.contains(&format!("{sha}  manifest.toml")), "{sums}");
}

//! The loader and validator end to end, on files written by each test.

use std::path::{Path, PathBuf};

use super::validate::host_name_id;
use super::*;

fn write(dir: &Path, text: &str) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join(crate::model::manifest::MANIFEST_FILE), "").unwrap();
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const MINIMAL: &str = "[model]\npath = \"model\"\n[[cameras]]\nid = \"c\"\nsource = \"replay\"\npath = \"frames\"\n";

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn defaults_relative_paths_and_environment_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), MINIMAL);
    let c = load_with_env(&path, &[]).unwrap();
    assert_eq!(c.model.path, dir.path().join("model"));
    // Without node.id the host name is the id.
    assert_eq!((c.mqtt.port, c.mqtt.base_topic), (1883, format!("edge-inspect/{}", host_name_id())));
    assert_ne!(host_name_id(), "");
    assert_eq!(c.pipeline.queue_capacity, 2);
    assert_eq!(c.recorder.dir, PathBuf::from("/var/lib/edge-inspect/captures"));
    let c = load_with_env(
        &path,
        &env(&[("EDGE_INSPECT__MQTT__PORT", "1884"), ("EDGE_INSPECT__NODE__ID", "line2"), ("OTHER__X", "1")]),
    )
    .unwrap();
    assert_eq!((c.mqtt.port, c.mqtt.base_topic.as_str()), (1884, "edge-inspect/line2"));
    // The fleet's topics live at `<prefix>/fleet/…`: no node may take that id.
    let e = load_with_env(&path, &env(&[("EDGE_INSPECT__NODE__ID", "fleet")])).unwrap_err().to_string();
    assert!(e.contains("node.id") && e.contains("reserved for the fleet"), "{e}");
    // A download retried in a busy loop would hammer the store.
    assert_eq!(c.fleet.retry, std::time::Duration::from_secs(30));
    let e = load_with_env(&path, &env(&[("EDGE_INSPECT__FLEET__RETRY_S", "0")])).unwrap_err().to_string();
    assert!(e.contains("fleet.retry_s") && e.contains('0'), "{e}");
}

#[test]
fn a_file_as_state_dir_an_empty_glob_and_a_missing_models_dir_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[node]\nstate_dir = \"/etc/passwd\"\n[model]\npath = \"model\"\nmodels_dir = \"bundles\"\n\
                [[cameras]]\nid = \"c\"\nsource = \"replay\"\npath = \"frames/*.png\"\n";
    let path = write(dir.path(), text);
    let errors = load_with_env(&path, &[]).unwrap_err();
    let messages: Vec<String> = errors.issues.iter().map(|i| format!("{}: {}", i.key, i.message)).collect();
    for expected in
        ["node.state_dir: /etc/passwd: exists and is not a directory", "model.models_dir: ", "cameras[0].path: "]
    {
        assert!(messages.iter().any(|m| m.starts_with(expected)), "no issue {expected}: {messages:?}");
    }
    assert!(errors.to_string().contains("the pattern matches no file"), "{errors}");
    // With a frame for the pattern and the folder there, both are accepted.
    std::fs::write(dir.path().join("frames/0.png"), b"").unwrap();
    std::fs::create_dir(dir.path().join("bundles")).unwrap();
    let text = text.replace("/etc/passwd", "state");
    assert!(load_with_env(&write(dir.path(), &text), &[]).is_ok());
}

#[test]
fn every_problem_is_reported_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{MINIMAL}[pipeline]\nmax_batch = 0\nmax_wait_ms = \"soon\"\n[mqtt]\nport = 0\nusername = \"u\"\n\
         [mqtt.tls]\nca_file = \"/no/ca.pem\"\n[recorder]\nnormal_sample_rate = 2.0\nsize = 3\n[http]\nlisten = \"nowhere\"\n\
         [[cameras]]\nid = \"c\"\nsource = \"usb\"\nroi = [1, 2]\n"
    );
    let path = write(dir.path(), &text);
    let errors = load_with_env(&path, &[]).unwrap_err();
    let keys: Vec<&str> = errors.issues.iter().map(|i| i.key.as_str()).collect();
    for expected in [
        "pipeline.max_wait_ms",
        "mqtt.port",
        "mqtt.password",
        "mqtt.tls.ca_file",
        "recorder.normal_sample_rate",
        "recorder.size",
        "http.listen",
        "cameras[1].id",
        "cameras[1].roi",
        "cameras[1].source",
    ] {
        assert!(keys.contains(&expected), "no issue for {expected}: {errors}");
    }
    // A type error in a section does not hide the other sections' problems.
    assert!(errors.to_string().contains("invalid type"), "{errors}");
}

#[test]
fn the_tile_batch_is_auto_or_a_bounded_count() {
    use crate::infer::batch_size::TileBatch;
    let dir = tempfile::tempdir().unwrap();
    let c = load_with_env(&write(dir.path(), MINIMAL), &[]).unwrap();
    assert_eq!(c.runtime.tile_batch, TileBatch::Auto);
    let with =
        |value: &str| load_with_env(&write(dir.path(), &format!("{MINIMAL}[runtime]\ntile_batch = {value}\n")), &[]);
    assert_eq!(with("64").unwrap().runtime.tile_batch, TileBatch::Fixed(64));
    assert_eq!(with("\"auto\"").unwrap().runtime.tile_batch, TileBatch::Auto);
    let from_env = load_with_env(&write(dir.path(), MINIMAL), &env(&[("EDGE_INSPECT__RUNTIME__TILE_BATCH", "16")]));
    assert_eq!(from_env.unwrap().runtime.tile_batch, TileBatch::Fixed(16));
    for bad in ["0", "1025", "\"lots\"", "-3"] {
        let errors = with(bad).unwrap_err();
        assert!(errors.issues.iter().any(|i| i.key == "runtime.tile_batch"), "{bad}: {errors}");
    }
}

#[test]
fn the_screen_recall_is_the_bundles_off_or_a_recall() {
    use crate::postprocess::screen::ScreenChoice;
    let dir = tempfile::tempdir().unwrap();
    let c = load_with_env(&write(dir.path(), MINIMAL), &[]).unwrap();
    assert_eq!(c.model.screen_recall, ScreenChoice::Bundle);
    let with = |value: &str| {
        let text = MINIMAL.replace("[model]\n", &format!("[model]\nscreen_recall = {value}\n"));
        load_with_env(&write(dir.path(), &text), &[])
    };
    assert_eq!(with("0.8").unwrap().model.screen_recall, ScreenChoice::Recall(0.8));
    assert_eq!(with("1").unwrap().model.screen_recall, ScreenChoice::Recall(1.0));
    assert_eq!(with("\"off\"").unwrap().model.screen_recall, ScreenChoice::Off);
    assert_eq!(with("\"bundle\"").unwrap().model.screen_recall, ScreenChoice::Bundle);
    let from_env = |value: &str| {
        load_with_env(&write(dir.path(), MINIMAL), &env(&[("EDGE_INSPECT__MODEL__SCREEN_RECALL", value)]))
    };
    assert_eq!(from_env("0.9").unwrap().model.screen_recall, ScreenChoice::Recall(0.9));
    assert_eq!(from_env("off").unwrap().model.screen_recall, ScreenChoice::Off);
    for bad in ["0", "1.5", "-0.2", "\"fast\""] {
        let errors = with(bad).unwrap_err();
        assert!(errors.issues.iter().any(|i| i.key == "model.screen_recall"), "{bad}: {errors}");
    }
}

#[test]
fn secrets_come_from_files_and_systemd_credentials() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("mqtt-password"), "from-systemd").unwrap();
    let file = write(
        dir.path(),
        &format!("{MINIMAL}[mqtt]\nusername = \"u\"\npassword_file = \"{}\"\n", dir.path().join("pw").display()),
    );
    let c = load_with_env(&file, &[]).unwrap();
    assert_eq!(c.mqtt.credentials, Some(("u".into(), "s3cret".into())));
    assert!(!format!("{:?}", c.mqtt).contains("s3cret"), "passwords stay out of debug output");
    let cred =
        write(dir.path(), &format!("{MINIMAL}[mqtt]\nusername = \"u\"\npassword_credential = \"mqtt-password\"\n"));
    let c = load_with_env(&cred, &env(&[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())])).unwrap();
    assert_eq!(c.mqtt.credentials, Some(("u".into(), "from-systemd".into())));
    let e = load_with_env(&cred, &[]).unwrap_err().to_string();
    assert!(e.contains("mqtt.password_credential") && e.contains("CREDENTIALS_DIRECTORY"), "{e}");
}

#[test]
fn the_review_pages_write_token_is_a_secret_of_at_least_16_characters() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("http-token"), "0123456789abcdef-token\n").unwrap();
    let cred = write(dir.path(), &format!("{MINIMAL}[http]\ntoken_credential = \"http-token\"\nreview_hours = 8\n"));
    let c = load_with_env(&cred, &env(&[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())])).unwrap();
    assert_eq!(c.http.token.as_deref(), Some("0123456789abcdef-token"));
    assert_eq!(c.http.review_window, std::time::Duration::from_secs(8 * 3600));
    assert!(!format!("{:?}", c.http).contains("abcdef"), "the token stays out of debug output");
    let default = load_with_env(&write(dir.path(), MINIMAL), &[]).unwrap();
    assert_eq!((default.http.token, default.http.review_window.as_secs()), (None, 24 * 3600), "read-only by default");
    let short = write(dir.path(), &format!("{MINIMAL}[http]\ntoken = \"short\"\nreview_hours = 0\n"));
    let e = load_with_env(&short, &[]).unwrap_err().to_string();
    assert!(e.contains("http.token: a token of 5 characters; give at least 16"), "{e}");
    assert!(e.contains("http.review_hours"), "{e}");
}

#[test]
fn upload_needs_the_recorder_an_endpoint_a_bucket_and_both_halves_of_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = "[upload]\nenabled = true\nendpoint = \"http://127.0.0.1:9000\"\nbucket = \"recordings\"\n\
                access_key_id = \"node\"\nsecret_access_key = \"s3cret-key\"\n[recorder]\nenabled = true\n";
    let c = load_with_env(&write(dir.path(), &format!("{MINIMAL}{good}")), &[]).unwrap();
    assert_eq!((c.upload.prefix.as_str(), c.upload.region.as_str()), ("edge-inspect", "us-east-1"));
    assert_eq!(c.upload.credentials, Some(("node".into(), "s3cret-key".into())));
    assert!(!format!("{:?}", c.upload).contains("s3cret"), "the secret stays out of debug output");
    let bad = "[upload]\nenabled = true\nendpoint = \"ftp://x\"\nbucket = \"Not_A_Bucket\"\naccess_key_id = \"node\"\n\
               [recorder]\nenabled = false\n";
    let e = load_with_env(&write(dir.path(), &format!("{MINIMAL}{bad}")), &[]).unwrap_err().to_string();
    for key in ["upload.endpoint", "upload.bucket", "upload.access_key_id", "upload.enabled: needs [recorder]"] {
        assert!(e.contains(key), "{key}: {e}");
    }
}

#[test]
fn a_cameras_inspection_mask_is_read_and_checked_against_its_roi() {
    let dir = tempfile::tempdir().unwrap();
    image::GrayImage::from_pixel(40, 30, image::Luma([255])).save(dir.path().join("mask.png")).unwrap();
    let with = |extra: &str| load_with_env(&write(dir.path(), &format!("{MINIMAL}{extra}")), &[]);
    let c = with("mask = \"mask.png\"\nroi = [5, 5, 40, 30]\n").unwrap();
    assert_eq!(c.cameras[0].mask.as_ref().map(|m| m.size()), Some([40, 30]), "relative to the config file");
    let issue = |extra: &str| {
        let errors = with(extra).unwrap_err();
        let issue = errors.issues.iter().find(|i| i.key == "cameras[0].mask").unwrap_or_else(|| panic!("{errors}"));
        issue.to_string()
    };
    assert!(issue("mask = \"mask.png\"\nroi = [0, 0, 64, 30]\n").contains("40x30, but the ROI is 64x30"));
    assert!(issue("mask = \"nowhere.png\"\n").contains("nowhere.png"));
}

#[cfg(feature = "gstreamer")]
#[test]
fn gstreamer_sources_take_a_uri_or_a_pipeline_and_a_password_only_from_a_file() {
    use crate::capture::SourceConfig;
    use crate::capture::gstreamer::Input;
    let dir = tempfile::tempdir().unwrap();
    let camera =
        |keys: &str| format!("[model]\npath = \"model\"\n[[cameras]]\nid = \"c\"\nsource = \"gstreamer\"\n{keys}\n");
    let messages = |keys: &str| -> Vec<String> {
        let path = write(dir.path(), &camera(keys));
        let errors = load_with_env(&path, &[]).unwrap_err();
        errors.issues.iter().map(|i| format!("{}: {}", i.key, i.message)).collect()
    };
    let refused = [
        ("", "cameras[0].source: a gstreamer source takes one of uri and pipeline"),
        ("uri = \"rtsp://x\"\npipeline = \"videotestsrc\"", "cameras[0].source: a gstreamer source takes one"),
        ("uri = \"rtsp://u:pw@cam/1\"", "cameras[0].uri: holds user information"),
        ("uri = \"not a uri\"", "cameras[0].uri: 'not a uri' is not a URI"),
        ("pipeline = \"nosuchsrc-abc ! decodebin\"", "cameras[0].pipeline: no element \"nosuchsrc-abc\""),
        ("uri = \"rtsp://cam/1\"\nusername = \"u\"", "cameras[0].username: username and a password"),
        ("uri = \"rtsp://cam/1\"\nbuffers = 0", "cameras[0].buffers: must be in 1..=64"),
    ];
    for (keys, expected) in refused {
        let found = messages(keys);
        assert!(found.iter().any(|m| m.starts_with(expected)), "{keys}: no issue {expected}: {found:?}");
    }
    std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
    let keys =
        format!("uri = \"rtsp://cam/1\"\nusername = \"u\"\npassword_file = \"{}\"", dir.path().join("pw").display());
    let c = load_with_env(&write(dir.path(), &camera(&keys)), &[]).unwrap();
    let SourceConfig::Gstreamer(settings) = &c.cameras[0].source else { panic!("{:?}", c.cameras[0].source) };
    assert_eq!(settings.input, Input::Uri("rtsp://cam/1".into()));
    assert_eq!(settings.credentials, Some(("u".into(), "s3cret".into())));
    assert_eq!(settings.buffers, 2);
}

#[test]
fn triggers_are_refused_where_they_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let messages = |text: &str| -> Vec<String> {
        let errors = load_with_env(&write(dir.path(), text), &[]).unwrap_err();
        errors.issues.iter().map(|i| format!("{}: {}", i.key, i.message)).collect()
    };
    // The line triggers only a GenICam camera: a replay has no frame counter.
    let line = messages(&format!("{MINIMAL}trigger = \"camera\"\n"));
    assert_eq!(line.len(), 1, "{line:?}");
    assert!(line[0].starts_with("cameras[0].trigger: \"camera\"") && line[0].contains("source = \"genicam\""));
    let mqtt_off = messages(&format!("[mqtt]\nenabled = false\n{MINIMAL}trigger = \"mqtt\"\n"));
    assert!(mqtt_off[0].starts_with("cameras[0].trigger: \"mqtt\" needs [mqtt] enabled"), "{mqtt_off:?}");
    let unknown = messages(&format!("{MINIMAL}trigger = \"plc\"\n"));
    assert!(unknown[0].ends_with("'plc' is not one of free, mqtt, camera"), "{unknown:?}");
    assert!(load_with_env(&write(dir.path(), &format!("{MINIMAL}trigger = \"mqtt\"\n")), &[]).is_ok());
}

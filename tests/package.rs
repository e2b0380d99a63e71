//! Issue 27: the Debian packages, installed on this machine as a plant's IT would install
//! them. Builds them with `scripts/build-deb.sh` (dev profile: the same packaging, a faster
//! build), installs them with apt, checks the files, the user, the unit and the installed
//! binaries with the installed runtime (nothing from the source tree), upgrades to a second
//! build with another config default, refuses a restart on a config the new binary rejects,
//! downgrades, and purges. Needs root (it installs system packages) and cleans up after
//! itself; it refuses to run where edge-inspect is installed already.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CONF: &str = "/etc/edge-inspect/edge-inspect.toml";
const PACKAGES: [&str; 4] = ["edge-inspect-gpu", "edge-inspect-train", "edge-inspect-demo", "edge-inspect"];
const SECOND: &str = concat!(env!("CARGO_PKG_VERSION"), "+test2");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `program args` with a system's environment (no ORT_DYLIB_PATH, no config overrides
/// from the test's), returning its output whatever the exit status.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"))
}

/// As [`run`], and it must succeed; returns stdout and stderr together.
fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{program} {args:?} failed ({}):\n{text}", out.status);
    text
}

/// Builds the packages into `out` with extra `build-deb.sh` arguments; returns their paths.
fn build(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--profile", "dev", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let built = Command::new(repo().join("scripts/build-deb.sh")).args(&args).output().expect("build-deb.sh runs");
    assert!(built.status.success(), "build-deb.sh {args:?}:\n{}", String::from_utf8_lossy(&built.stderr));
    String::from_utf8(built.stdout).unwrap().lines().map(str::to_string).collect()
}

fn installed_version(package: &str) -> Option<String> {
    let out = run("dpkg-query", &["-W", "-f", "${Status} ${Version}", package]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.strip_prefix("install ok installed ").map(str::to_string)
}

/// Purges whatever the test installed, even when it fails half-way.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut args = vec!["--purge"];
        args.extend(PACKAGES);
        let _ = run("dpkg", &args);
    }
}

/// The state a node accumulates: it must survive upgrades and downgrades.
fn write_state() -> Vec<(PathBuf, Vec<u8>)> {
    let state = Path::new("/var/lib/edge-inspect");
    let files = [
        ("controls.json", b"{\"cameras\":{\"demo\":{\"enabled\":false}}}".to_vec()),
        ("outbox/000000000017.json", b"{\"topic\":\"edge-inspect/node/demo/anomaly\"}".to_vec()),
        (
            "captures/demo/2026-12-04/frame-000001.png",
            std::fs::read(repo().join("data/brick/test/scratch/000.png")).unwrap(),
        ),
        ("labels.jsonl", b"{\"seq\":1,\"label\":\"defect\"}\n".to_vec()),
        ("models/line-a/manifest.toml", std::fs::read(repo().join("models/brick-huber/manifest.toml")).unwrap()),
    ];
    let written = files
        .into_iter()
        .map(|(name, bytes)| {
            let path = state.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
            (path, bytes)
        })
        .collect::<Vec<_>>();
    ok("chown", &["-R", "edge-inspect:edge-inspect", "/var/lib/edge-inspect"]);
    written
}

fn assert_state(state: &[(PathBuf, Vec<u8>)], when: &str) {
    for (path, bytes) in state {
        let now = std::fs::read(path).unwrap_or_else(|e| panic!("{when}: {} lost: {e}", path.display()));
        assert_eq!(&now, bytes, "{when}: {} changed", path.display());
    }
}

#[test]
fn packages_install_upgrade_downgrade_and_purge() {
    assert_eq!(ok("id", &["-u"]).trim(), "0", "the package test installs system packages: run it as root (CI does)");
    for package in PACKAGES {
        assert!(installed_version(package).is_none(), "{package} is installed here already: the test would replace it");
    }
    let _cleanup = Cleanup;
    let tmp = tempfile::tempdir().unwrap();
    // With --gpu: the GPU runtime set is in the cache already (tests/it/gpu_runtime.rs).
    let first = build(&tmp.path().join("v1"), &["--gpu"]);
    assert_eq!(first.len(), 4, "{first:?}");
    let conf = std::fs::read_to_string(repo().join("packaging/edge-inspect.toml")).unwrap();
    let changed = conf.replace("max_age_days = 30", "max_age_days = 14");
    assert_ne!(changed, conf, "the shipped config keeps recordings 30 days");
    let second_conf = tmp.path().join("second.toml");
    std::fs::write(&second_conf, &changed).unwrap();
    let second = build(
        &tmp.path().join("v2"),
        &["--version", SECOND, "--conffile", second_conf.to_str().unwrap(), "--packages", "edge-inspect"],
    );

    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(first.iter().map(String::as_str));
    ok("apt-get", &install);
    gpu_runtime_chosen_then_handed_back(tmp.path());
    installed_as_packaged(tmp.path());

    let state = write_state();
    let edited = std::fs::read_to_string(CONF).unwrap().replace("id = \"edge-inspect\"", "id = \"line3-station2\"");
    std::fs::write(CONF, &edited).unwrap();

    // Upgrade: the administrator's config is kept, the new default lands beside it.
    ok("apt-get", &["install", "-y", "-o", "Dpkg::Options::=--force-confold", &second[0]]);
    assert_eq!(installed_version("edge-inspect").as_deref(), Some(SECOND));
    assert!(ok("edge-inspect", &["--version"]).contains(SECOND));
    assert_eq!(std::fs::read_to_string(CONF).unwrap(), edited, "the edited conffile survives the upgrade");
    let dist = std::fs::read_to_string(format!("{CONF}.dpkg-dist")).unwrap();
    assert!(dist.contains("max_age_days = 14"), "{dist}");
    assert_state(&state, "after the upgrade");

    downgrade_refused_then_done(&first[0], &edited);
    assert_state(&state, "after the downgrade");

    purged();
}

/// With edge-inspect-gpu installed the binary loads its runtime (CPU provider here: no GPU);
/// removing it hands the node back to the CPU library.
fn gpu_runtime_chosen_then_handed_back(tmp: &Path) {
    let runtime = || std::fs::canonicalize("/usr/lib/edge-inspect/libonnxruntime.so").unwrap();
    assert!(runtime().starts_with("/usr/lib/edge-inspect/gpu"), "the GPU runtime is preferred: {:?}", runtime());
    let log = infer(&tmp.join("infer-gpu"));
    assert!(
        log.contains("/usr/lib/edge-inspect/gpu/libonnxruntime.so.1.31.1"),
        "the GPU package's runtime ran it:\n{log}"
    );
    ok("apt-get", &["remove", "-y", "edge-inspect-gpu"]);
    assert!(runtime().starts_with("/usr/lib/edge-inspect/cpu"), "back to the CPU runtime: {:?}", runtime());
}

/// `infer` with the installed binary on a demo frame, without anything from the source tree;
/// returns its log.
fn infer(out: &Path) -> String {
    let frame = "/usr/share/edge-inspect/demo/frames/scratch-000.png";
    let model = "/usr/share/edge-inspect/models/brick-huber";
    let log = ok("edge-inspect", &["infer", "--model", model, "--out", out.to_str().unwrap(), frame]);
    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert!(results.contains("scratch-000.png") && results.contains("\"score\""), "{results}");
    log
}

/// Files, user, unit, and the installed binaries running on the installed runtime.
fn installed_as_packaged(tmp: &Path) {
    for path in [
        "/usr/bin/edge-inspect",
        "/usr/bin/edge-inspect-train",
        "/lib/systemd/system/edge-inspect.service",
        "/usr/lib/sysusers.d/edge-inspect.conf",
        "/usr/lib/tmpfiles.d/edge-inspect.conf",
        CONF,
        "/usr/share/doc/edge-inspect/copyright",
        "/usr/share/edge-inspect/models/brick-huber/model.onnx",
        "/usr/share/edge-inspect/backbone/efficientnet-lite0-57934424.pth",
    ] {
        assert!(Path::new(path).is_file(), "{path} installed");
    }
    let runtime = std::fs::canonicalize("/usr/lib/edge-inspect/libonnxruntime.so").unwrap();
    assert!(runtime.starts_with("/usr/lib/edge-inspect/cpu"), "the CPU runtime is the alternative: {runtime:?}");
    let user = ok("getent", &["passwd", "edge-inspect"]);
    let fields: Vec<&str> = user.trim().split(':').collect();
    assert_eq!(fields[5], "/var/lib/edge-inspect", "{user}");
    assert!(fields[6].ends_with("nologin"), "{user}");
    let uid: u32 = fields[2].parse().unwrap();
    let state = std::fs::metadata("/var/lib/edge-inspect").unwrap();
    assert_eq!((state.uid(), state.mode() & 0o777), (uid, 0o750));
    assert_eq!(
        std::fs::read_link("/var/lib/edge-inspect/models/current").unwrap(),
        Path::new("/usr/share/edge-inspect/models/brick-huber")
    );

    let unit = "/lib/systemd/system/edge-inspect.service";
    ok("systemd-analyze", &["verify", unit]);
    let security = ok("systemd-analyze", &["security", "--offline=true", unit]);
    let exposure: f64 = security
        .lines()
        .find_map(|l| l.split("edge-inspect.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure in:\n{security}"));
    assert!(exposure <= 2.5, "exposure {exposure}");

    let stamp = format!("{} (git {})", env!("CARGO_PKG_VERSION"), env!("EDGE_INSPECT_COMMIT"));
    assert_eq!(ok("edge-inspect", &["--version"]).trim(), format!("edge-inspect {stamp}"));
    assert!(ok("edge-inspect-train", &["--version"]).contains(&stamp));
    ok("runuser", &["-u", "edge-inspect", "--", "edge-inspect", "check-config", "--config", CONF]);
    let log = infer(&tmp.join("infer"));
    assert!(log.contains("/usr/lib/edge-inspect/cpu/libonnxruntime.so.1.32.0"), "the installed runtime ran it:\n{log}");
}

/// A downgrade whose binary refuses the config is not restarted and fails; with the config
/// fixed, `dpkg --configure -a` completes it.
fn downgrade_refused_then_done(first: &str, edited: &str) {
    let broken = edited.replace("max_batch = 8", "max_batch = 0");
    assert_ne!(broken, edited);
    std::fs::write(CONF, &broken).unwrap();
    let refused = run("dpkg", &["-i", "--force-confold", first]);
    let text = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(!refused.status.success(), "a refused config fails the configuration:\n{text}");
    assert!(text.contains("pipeline.max_batch") && text.contains("NOT restarted"), "{text}");
    let status = ok("dpkg-query", &["-W", "-f", "${Status}", "edge-inspect"]);
    assert!(status.ends_with("half-configured"), "{status}");

    std::fs::write(CONF, edited).unwrap();
    ok("dpkg", &["--configure", "-a"]);
    assert_eq!(installed_version("edge-inspect").as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert!(!ok("edge-inspect", &["--version"]).contains(SECOND));
}

/// Nothing of the packages is left.
fn purged() {
    let mut purge = vec!["purge", "-y"];
    purge.extend(PACKAGES);
    ok("apt-get", &purge);
    for package in PACKAGES {
        assert_eq!(installed_version(package), None);
        let listed = run("dpkg-query", &["-W", package]);
        assert!(!listed.status.success(), "{package} is still known to dpkg");
    }
    for path in [
        "/usr/bin/edge-inspect",
        "/usr/bin/edge-inspect-train",
        "/usr/lib/edge-inspect",
        "/usr/share/edge-inspect",
        "/etc/edge-inspect",
        "/var/lib/edge-inspect",
        "/var/cache/edge-inspect",
        "/lib/systemd/system/edge-inspect.service",
        "/etc/systemd/system/multi-user.target.wants/edge-inspect.service",
    ] {
        assert!(std::fs::symlink_metadata(path).is_err(), "{path} is left after the purge");
    }
    assert!(!run("getent", &["passwd", "edge-inspect"]).status.success(), "the user is left");
    assert!(!run("update-alternatives", &["--query", "edge-inspect-onnxruntime"]).status.success());
}

//! Stamps the build with its version and git commit (`EDGE_INSPECT_VERSION`,
//! `EDGE_INSPECT_COMMIT`: what `--version` and `/metrics` report), and compiles the oneDNN
//! shim (`native/onednn.cpp`) that the `train` feature's CPU training uses
//! (`model::onednn`), linking oneDNN (Debian `libdnnl-dev`, which `scripts/setup.sh`
//! installs). The edge build (no `train`) needs neither.

use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=native/onednn.cpp");
    stamp_version();
    if std::env::var_os("CARGO_FEATURE_TRAIN").is_none() {
        return;
    }
    let compiled = cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("native/onednn.cpp")
        .warnings(true)
        .extra_warnings(true)
        .try_compile("edge_onednn");
    if let Err(error) = compiled {
        panic!(
            "the `train` feature needs oneDNN's C++ headers and library (Debian: libdnnl-dev, \
             installed by scripts/setup.sh): {error}"
        );
    }
    println!("cargo::rustc-link-lib=dylib=dnnl");
    println!("cargo::rustc-link-lib=dylib=gomp");
}

/// The package version (`EDGE_INSPECT_PACKAGE_VERSION`, set by `scripts/build-deb.sh`, else the
/// crate's) and the commit the tree was built from (`unknown` outside a git checkout).
fn stamp_version() {
    println!("cargo::rerun-if-env-changed=EDGE_INSPECT_PACKAGE_VERSION");
    let version = std::env::var("EDGE_INSPECT_PACKAGE_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION"));
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        // A new commit or checkout moves HEAD or a branch: a loose file under refs/ (cargo
        // scans a directory whole) or packed-refs after `git gc`. Only paths that exist are
        // named: cargo treats a missing one as changed, which rebuilt the crate on every run
        // in a checkout without packed-refs.
        for name in ["HEAD", "refs", "packed-refs"] {
            let path = format!("{dir}/{name}");
            if std::path::Path::new(&path).exists() {
                println!("cargo::rerun-if-changed={path}");
            }
        }
    }
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    println!("cargo::rustc-env=EDGE_INSPECT_VERSION={version}");
    println!("cargo::rustc-env=EDGE_INSPECT_COMMIT={commit}");
    println!("cargo::rustc-env=EDGE_INSPECT_VERSION_LINE={version} (git {commit})");
}

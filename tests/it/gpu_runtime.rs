//! The CUDA inference set-up without a GPU: `scripts/fetch-onnxruntime.sh --gpu` assembles
//! ONNX Runtime with its CUDA and TensorRT providers from pinned PyPI wheels, and this checks
//! the layout a GPU host would get — the files, their checksums, that `ldd` resolves every
//! library but the driver's and TensorRT's own, and that the real binary runs on it: on CPU
//! as usual, and asked for CUDA, failing explicitly (no silent fallback) on the one library
//! only a GPU host has.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The libraries the folder must hold: ONNX Runtime, its providers, and what the CUDA
/// provider links (cudart, cuBLAS, cuRAND) or loads at run time (cuDNN, NVRTC).
const EXPECTED: &[&str] = &[
    "libonnxruntime.so",
    "libonnxruntime.so.1.31.1",
    "libonnxruntime_providers_shared.so",
    "libonnxruntime_providers_cuda.so",
    "libonnxruntime_providers_tensorrt.so",
    "libcudart.so.13",
    "libcublas.so.13",
    "libcublasLt.so.13",
    "libcurand.so.10",
    "libcudnn.so.9",
    "libcudnn_adv.so.9",
    "libcudnn_cnn.so.9",
    "libcudnn_engines_precompiled.so.9",
    "libcudnn_engines_runtime_compiled.so.9",
    "libcudnn_engines_tensor_ir.so.9",
    "libcudnn_ext.so.9",
    "libcudnn_graph.so.9",
    "libcudnn_heuristic.so.9",
    "libcudnn_ops.so.9",
    "libnvrtc.so.13",
    "libnvrtc-builtins.so.13.5",
];

/// What only a GPU host provides: the driver, and TensorRT 10 (for its provider only).
const FROM_THE_HOST: &[&str] = &["libcuda.so.1", "libnvinfer.so.10", "libnvonnxparser.so.10"];

/// The assembled runtime's `libonnxruntime.so`, fetched once for both tests.
fn fetch() -> PathBuf {
    static FETCHED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FETCHED
        .get_or_init(|| {
            let out = Command::new(repo().join("scripts/fetch-onnxruntime.sh")).arg("--gpu").output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        })
        .clone()
}

/// The libraries `ldd` cannot find for `library`.
fn unresolved(library: &Path) -> BTreeSet<String> {
    let out = Command::new("ldd").arg(library).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().filter(|l| l.contains("not found")).map(|l| l.split_whitespace().next().unwrap().to_string()).collect()
}

#[test]
fn the_gpu_runtime_is_complete_verified_and_resolves_but_for_the_driver() {
    let lib = fetch();
    let dir = lib.parent().unwrap();
    assert_eq!(lib.file_name().unwrap(), "libonnxruntime.so.1.31.1");
    let present: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".so"))
        .collect();
    let expected: BTreeSet<String> = EXPECTED.iter().map(|s| s.to_string()).collect();
    assert_eq!(present, expected, "the folder holds exactly the runtime");

    let check = Command::new("sha256sum").args(["--quiet", "-c", "SHA256SUMS"]).current_dir(dir).output().unwrap();
    assert!(check.status.success(), "checksums: {}", String::from_utf8_lossy(&check.stdout));

    for name in EXPECTED {
        let missing = unresolved(&dir.join(name));
        let allowed: BTreeSet<String> = match *name {
            "libonnxruntime_providers_tensorrt.so" => FROM_THE_HOST.iter().map(|s| s.to_string()).collect(),
            _ => BTreeSet::from(["libcuda.so.1".to_string()]),
        };
        assert!(missing.is_subset(&allowed), "{name}: unresolved {missing:?}");
    }
    let cuda = unresolved(&dir.join("libonnxruntime_providers_cuda.so"));
    assert!(
        cuda.iter().all(|l| l == "libcuda.so.1"),
        "the CUDA provider finds its CUDA libraries beside it (RUNPATH $ORIGIN): {cuda:?}"
    );
}

#[test]
fn the_binary_runs_on_the_gpu_runtime_and_never_falls_back_silently() {
    let lib = fetch();
    let bench = |provider: &str| {
        Command::new(env!("CARGO_BIN_EXE_edge-inspect"))
            .args(["bench", "--model", "models/brick-huber", "--batches", "1", "--ddim-steps", "1", "--repeats", "2"])
            .args(["--provider", provider])
            .env("ORT_DYLIB_PATH", &lib)
            .current_dir(repo())
            .output()
            .unwrap()
    };
    let cpu = bench("cpu");
    assert!(cpu.status.success(), "the GPU build serves the CPU path: {}", String::from_utf8_lossy(&cpu.stderr));

    let cuda = bench("cuda");
    let text = String::from_utf8_lossy(&cuda.stderr);
    if Path::new("/dev/nvidia0").exists() {
        assert!(cuda.status.success(), "a GPU host runs the CUDA provider: {text}");
        return;
    }
    assert!(!cuda.status.success(), "no GPU here, and no silent fallback: {text}");
    assert!(text.contains("no execution provider could be registered"), "{text}");
    // Everything the provider links resolved: the only library missing is the driver's.
    assert!(text.contains("libcuda.so.1: cannot open shared object file"), "{text}");
}

/// The drill for ONNX Runtime's telemetry (issue 23): Microsoft's Linux build keeps a
/// device id and an event queue under `~/.cache/Microsoft` and looks its upload host up.
/// `infer` and `check-config` with a fresh home leave it empty.
#[test]
fn no_telemetry_is_kept_or_sent() {
    let home = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let status = Command::new(env!("CARGO_BIN_EXE_edge-inspect"))
            .args(args)
            .env("HOME", home.path())
            .env_remove("XDG_CACHE_HOME")
            .env_remove("ORT_DISABLE_TELEMETRY")
            .output()
            .unwrap();
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    };
    let model = repo().join("models/brick-huber");
    let image = repo().join("tests/fixtures/brick_clean.png");
    run(&[
        "infer".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--out".as_ref(),
        out.path().as_os_str(),
        image.as_os_str(),
    ]);
    run(&["check-config".as_ref(), "--config".as_ref(), repo().join("config/edge-inspect.toml").as_os_str()]);
    let kept: Vec<_> = walkdir(home.path());
    assert!(kept.is_empty(), "ONNX Runtime wrote under $HOME: {kept:?}");
}

/// Every file below `dir`.
fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() { files.extend(walkdir(&path)) } else { files.push(path) }
    }
    files
}

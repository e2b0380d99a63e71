//! Compiles the oneDNN shim (`native/onednn.cpp`) that the `train` feature's
//! CPU training uses (`model::onednn`), and links oneDNN (Debian `libdnnl-dev`, which
//! `scripts/setup.sh` installs). The edge build (no `train`) needs neither.

fn main() {
    println!("cargo::rerun-if-changed=native/onednn.cpp");
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

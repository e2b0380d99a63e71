//! The RDDPM UNet, defined once for training and for export.
//!
//! The layer tree is a burn `Module` (so burn trains it), and the data flow through it is
//! [`UNet::walk`], written once against the [`UNetOps`] trait. Two interpreters run that
//! walk: [`BurnOps`] computes tensors (training, the parity reference; on burn's Flex
//! backend its convolutions, SiLU and GroupNorm run on oneDNN, `model::onednn`) and
//! `model::onnx_export` emits ONNX nodes. Because both follow the same walk and the same
//! parameter names, the exported graph cannot drift from the trained model; the parity
//! test in `tests/it/model_core.rs` checks the numerics on top of that.
//!
//! Layout: conv_in → per level `res_blocks` ResBlocks (each output kept as a skip) and a
//! stride-2 conv → middle ResBlock, optional self-attention, ResBlock → per level (reversed)
//! concat skip + ResBlock, nearest ×2 + conv → GroupNorm, SiLU, conv_out.
//! ResBlock: GN → SiLU → conv3×3 → + Linear(time) → GN → SiLU → conv3×3, 1×1 skip on
//! width change. Time: sinusoidal(t, base) → Linear → SiLU → Linear → SiLU.

use burn::module::{Module, Param, ParamId};
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::architecture::{ArchitectureError, UNetConfig};

/// GroupNorm epsilon, shared with the exporter.
pub const GROUP_NORM_EPS: f32 = 1e-5;

/// GroupNorm written with mean/sub/sqrt primitives (on Flex, its normalisation runs on
/// oneDNN instead: `model::onednn`).
///
/// burn-nn's GroupNorm would do, but this form maps one-to-one onto the exported
/// InstanceNormalization lowering and keeps burn-onnx able to trace the model too.
#[derive(Module, Debug)]
pub struct GroupNorm {
    pub gamma: Param<Tensor<1>>,
    pub beta: Param<Tensor<1>>,
    pub groups: usize,
}

#[derive(Module, Debug)]
pub struct ResBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_proj: Linear,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub skip: Option<Conv2d>,
}

#[derive(Module, Debug)]
pub struct Attention {
    pub norm: GroupNorm,
    pub q: Conv2d,
    pub k: Conv2d,
    pub v: Conv2d,
    pub proj: Conv2d,
}

#[derive(Module, Debug)]
pub struct DownLevel {
    pub res: Vec<ResBlock>,
    pub down: Option<Conv2d>,
}

#[derive(Module, Debug)]
pub struct UpLevel {
    pub res: Vec<ResBlock>,
    pub up: Option<Conv2d>,
}

#[derive(Module, Debug)]
pub struct UNet {
    pub time_in: Linear,
    pub time_out: Linear,
    pub conv_in: Conv2d,
    pub down: Vec<DownLevel>,
    pub mid1: ResBlock,
    pub mid_attn: Option<Attention>,
    pub mid2: ResBlock,
    /// Ordered as walked: `up[0]` is the lowest resolution level.
    pub up: Vec<UpLevel>,
    pub norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub embedding_dim: usize,
}

/// The operations the UNet's data flow needs. `name` is the parameter path of the layer
/// (`down.0.res.0.conv1`), which the exporter uses for initializer names.
pub trait UNetOps {
    /// An image-shaped value `[N, C, H, W]`.
    type Map: Clone;
    /// A per-sample vector `[N, D]`.
    type Vector: Clone;
    /// The timestep input `[N]`.
    type Time;
    fn timestep_embedding(&mut self, t: Self::Time, dim: usize) -> Self::Vector;
    fn linear(&mut self, name: &str, layer: &Linear, x: Self::Vector) -> Self::Vector;
    fn silu_vector(&mut self, x: Self::Vector) -> Self::Vector;
    fn conv(&mut self, name: &str, layer: &Conv2d, x: Self::Map) -> Self::Map;
    fn group_norm(&mut self, name: &str, layer: &GroupNorm, x: Self::Map) -> Self::Map;
    fn silu(&mut self, x: Self::Map) -> Self::Map;
    fn add(&mut self, a: Self::Map, b: Self::Map) -> Self::Map;
    /// `x[n, c, :, :] + v[n, c]`.
    fn add_per_channel(&mut self, x: Self::Map, v: Self::Vector) -> Self::Map;
    fn concat_channels(&mut self, a: Self::Map, b: Self::Map) -> Self::Map;
    fn upsample_nearest2x(&mut self, x: Self::Map) -> Self::Map;
    /// Single-head attention over spatial positions: `v · softmax(qᵀk / √C)ᵀ`.
    fn attend(&mut self, q: Self::Map, k: Self::Map, v: Self::Map, channels: usize) -> Self::Map;
}

impl ResBlock {
    fn walk<O: UNetOps>(&self, ops: &mut O, name: &str, x: O::Map, emb: O::Vector) -> O::Map {
        let h = ops.group_norm(&format!("{name}.norm1"), &self.norm1, x.clone());
        let h = ops.silu(h);
        let h = ops.conv(&format!("{name}.conv1"), &self.conv1, h);
        let e = ops.linear(&format!("{name}.time_proj"), &self.time_proj, emb);
        let h = ops.add_per_channel(h, e);
        let h = ops.group_norm(&format!("{name}.norm2"), &self.norm2, h);
        let h = ops.silu(h);
        let h = ops.conv(&format!("{name}.conv2"), &self.conv2, h);
        let shortcut = match &self.skip {
            Some(skip) => ops.conv(&format!("{name}.skip"), skip, x),
            None => x,
        };
        ops.add(h, shortcut)
    }
}

impl Attention {
    fn walk<O: UNetOps>(&self, ops: &mut O, name: &str, x: O::Map) -> O::Map {
        let h = ops.group_norm(&format!("{name}.norm"), &self.norm, x.clone());
        let q = ops.conv(&format!("{name}.q"), &self.q, h.clone());
        let k = ops.conv(&format!("{name}.k"), &self.k, h.clone());
        let v = ops.conv(&format!("{name}.v"), &self.v, h);
        let channels = self.q.weight.dims()[0];
        let a = ops.attend(q, k, v, channels);
        let out = ops.conv(&format!("{name}.proj"), &self.proj, a);
        ops.add(x, out)
    }
}

/// What the down path hands the middle and the decoder.
struct Encoded<O: UNetOps> {
    emb: O::Vector,
    /// The coarsest map, after the last level.
    h: O::Map,
    /// Every down ResBlock's output, finest first.
    skips: Vec<O::Map>,
}

impl UNet {
    /// The forward data flow, for any interpreter.
    pub fn walk<O: UNetOps>(&self, ops: &mut O, x: O::Map, t: O::Time) -> O::Map {
        let Encoded { emb, mut h, mut skips } = self.encode(ops, x, t);
        h = self.mid1.walk(ops, "mid1", h, emb.clone());
        if let Some(attn) = &self.mid_attn {
            h = attn.walk(ops, "mid_attn", h);
        }
        h = self.mid2.walk(ops, "mid2", h, emb.clone());
        for (i, level) in self.up.iter().enumerate() {
            for (j, block) in level.res.iter().enumerate() {
                let skip = skips.pop().expect("one skip per down ResBlock");
                h = ops.concat_channels(h, skip);
                h = block.walk(ops, &format!("up.{i}.res.{j}"), h, emb.clone());
            }
            if let Some(up) = &level.up {
                h = ops.upsample_nearest2x(h);
                h = ops.conv(&format!("up.{i}.up"), up, h);
            }
        }
        let h = ops.group_norm("norm_out", &self.norm_out, h);
        let h = ops.silu(h);
        ops.conv("conv_out", &self.conv_out, h)
    }

    /// The encoder's features of `x` at timestep `t`: the output of every down-path
    /// ResBlock, finest level first (the maps the decoder receives as skips).
    pub fn walk_features<O: UNetOps>(&self, ops: &mut O, x: O::Map, t: O::Time) -> Vec<O::Map> {
        self.encode(ops, x, t).skips
    }

    /// The down path: time embedding, then every level's ResBlocks and downsampling.
    fn encode<O: UNetOps>(&self, ops: &mut O, x: O::Map, t: O::Time) -> Encoded<O> {
        let emb = ops.timestep_embedding(t, self.embedding_dim);
        let emb = ops.linear("time_in", &self.time_in, emb);
        let emb = ops.silu_vector(emb);
        let emb = ops.linear("time_out", &self.time_out, emb);
        let emb = ops.silu_vector(emb);

        let mut h = ops.conv("conv_in", &self.conv_in, x);
        let mut skips = Vec::new();
        for (i, level) in self.down.iter().enumerate() {
            for (j, block) in level.res.iter().enumerate() {
                h = block.walk(ops, &format!("down.{i}.res.{j}"), h, emb.clone());
                skips.push(h.clone());
            }
            if let Some(down) = &level.down {
                h = ops.conv(&format!("down.{i}.down"), down, h);
            }
        }
        Encoded { emb, h, skips }
    }

    /// ε-prediction: `x_t [N,C,H,W]`, `t [N]` (float timestep index) → `eps [N,C,H,W]`.
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1>) -> Tensor<4> {
        self.walk(&mut BurnOps, x, t)
    }

    /// A UNet with weights drawn from a seeded ChaCha8 stream (PyTorch-style uniform
    /// fan-in bounds), identical for a given seed on every machine and backend.
    pub fn init(config: &UNetConfig, seed: u64, device: &Device) -> Result<Self, ArchitectureError> {
        config.validate()?;
        let mut init = SeededInit {
            rng: ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
            groups: config.groups,
            next_id: 1,
        };
        let base = config.base_channels;
        let time_dim = config.time_dim();
        let widths = config.level_widths();
        let levels = widths.len();

        let time_in = init.linear(base, time_dim);
        let time_out = init.linear(time_dim, time_dim);
        let conv_in = init.conv(config.channels, base, 3, 1);
        let mut down = Vec::with_capacity(levels);
        let mut skip_widths = Vec::new();
        let mut ch = base;
        for (i, &width) in widths.iter().enumerate() {
            let mut res = Vec::with_capacity(config.res_blocks);
            for _ in 0..config.res_blocks {
                res.push(init.res_block(ch, width, time_dim));
                ch = width;
                skip_widths.push(ch);
            }
            let down_conv = (i + 1 < levels).then(|| init.conv(ch, ch, 3, 2));
            down.push(DownLevel { res, down: down_conv });
        }
        let mid1 = init.res_block(ch, ch, time_dim);
        let mid_attn = config.attention.then(|| init.attention(ch));
        let mid2 = init.res_block(ch, ch, time_dim);
        let mut up = Vec::with_capacity(levels);
        for (i, &width) in widths.iter().enumerate().rev() {
            let mut res = Vec::with_capacity(config.res_blocks);
            for _ in 0..config.res_blocks {
                let skip = skip_widths.pop().expect("one skip per down ResBlock");
                res.push(init.res_block(ch + skip, width, time_dim));
                ch = width;
            }
            let up_conv = (i > 0).then(|| init.conv(ch, ch, 3, 1));
            up.push(UpLevel { res, up: up_conv });
        }
        let norm_out = init.group_norm(ch);
        let conv_out = init.conv(ch, config.channels, 3, 1);
        Ok(Self { time_in, time_out, conv_in, down, mid1, mid_attn, mid2, up, norm_out, conv_out, embedding_dim: base })
    }
}

/// Deterministic weight initialisation; burn's own initialisers draw from a global RNG
/// that tests running in parallel would share.
///
/// Parameter ids are assigned in construction order, so two models built from one config
/// share ids: an optimizer checkpoint (keyed by id) then loads onto a rebuilt model.
struct SeededInit {
    rng: ChaCha8Rng,
    device: Device,
    groups: usize,
    next_id: u64,
}

impl SeededInit {
    fn param<const D: usize>(&mut self, values: Vec<f32>, shape: [usize; D]) -> Param<Tensor<D>> {
        let mut param = Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), &self.device));
        param.id = ParamId::from(self.next_id);
        self.next_id += 1;
        param
    }

    fn uniform<const D: usize>(&mut self, shape: [usize; D], bound: f32) -> Param<Tensor<D>> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| self.rng.random_range(-bound..=bound)).collect();
        self.param(values, shape)
    }

    fn constant(&mut self, len: usize, value: f32) -> Param<Tensor<1>> {
        self.param(vec![value; len], [len])
    }

    fn conv(&mut self, c_in: usize, c_out: usize, kernel: usize, stride: usize) -> Conv2d {
        let bound = 1.0 / ((c_in * kernel * kernel) as f32).sqrt();
        let pad = kernel / 2;
        Conv2d {
            weight: self.uniform([c_out, c_in, kernel, kernel], bound),
            bias: Some(self.uniform([c_out], bound)),
            stride: [stride, stride],
            kernel_size: [kernel, kernel],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Explicit(pad, pad, pad, pad),
        }
    }

    /// burn stores Linear weights as `[d_input, d_output]`.
    fn linear(&mut self, d_in: usize, d_out: usize) -> Linear {
        let bound = 1.0 / (d_in as f32).sqrt();
        Linear { weight: self.uniform([d_in, d_out], bound), bias: Some(self.uniform([d_out], bound)) }
    }

    fn group_norm(&mut self, channels: usize) -> GroupNorm {
        GroupNorm { gamma: self.constant(channels, 1.0), beta: self.constant(channels, 0.0), groups: self.groups }
    }

    fn res_block(&mut self, c_in: usize, c_out: usize, time_dim: usize) -> ResBlock {
        ResBlock {
            norm1: self.group_norm(c_in),
            conv1: self.conv(c_in, c_out, 3, 1),
            time_proj: self.linear(time_dim, c_out),
            norm2: self.group_norm(c_out),
            conv2: self.conv(c_out, c_out, 3, 1),
            skip: (c_in != c_out).then(|| self.conv(c_in, c_out, 1, 1)),
        }
    }

    fn attention(&mut self, channels: usize) -> Attention {
        Attention {
            norm: self.group_norm(channels),
            q: self.conv(channels, channels, 1, 1),
            k: self.conv(channels, channels, 1, 1),
            v: self.conv(channels, channels, 1, 1),
            proj: self.conv(channels, channels, 1, 1),
        }
    }
}

/// Sinusoid frequencies `exp(−ln(10000)·i/half)`, shared with the exporter.
pub fn embedding_frequencies(dim: usize) -> Vec<f32> {
    let half = dim / 2;
    (0..half).map(|i| (-(10000f32.ln()) * i as f32 / half as f32).exp()).collect()
}

/// GroupNorm's normalisation, without the affine part, in burn's primitives: each of a
/// sample's `groups` channel groups minus its mean, over `sqrt(variance + epsilon)`. What
/// `BurnOps` runs where oneDNN does not (wgpu), and the reference oneDNN's is tested against.
pub fn normalize_groups(x: Tensor<4>, groups: usize, epsilon: f32) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    let grouped = x.reshape([n, groups, (c / groups) * h * w]);
    let centered = grouped.clone().sub(grouped.mean_dim(2));
    let variance = centered.clone().square().mean_dim(2);
    centered.div(variance.add_scalar(epsilon).sqrt()).reshape([n, c, h, w])
}

/// Executes the walk with burn tensors.
pub struct BurnOps;

impl UNetOps for BurnOps {
    type Map = Tensor<4>;
    type Vector = Tensor<2>;
    type Time = Tensor<1>;

    fn timestep_embedding(&mut self, t: Tensor<1>, dim: usize) -> Tensor<2> {
        let freqs = embedding_frequencies(dim);
        let half = freqs.len();
        let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), &t.device());
        let args = t.unsqueeze_dim::<2>(1).mul(freqs.unsqueeze_dim::<2>(0));
        Tensor::cat(vec![args.clone().sin(), args.cos()], 1)
    }

    fn linear(&mut self, _name: &str, layer: &Linear, x: Tensor<2>) -> Tensor<2> {
        layer.forward(x)
    }

    fn silu_vector(&mut self, x: Tensor<2>) -> Tensor<2> {
        silu(x)
    }

    fn conv(&mut self, _name: &str, layer: &Conv2d, x: Tensor<4>) -> Tensor<4> {
        super::onednn::conv2d(layer, &x).unwrap_or_else(|| layer.forward(x))
    }

    fn group_norm(&mut self, _name: &str, layer: &GroupNorm, x: Tensor<4>) -> Tensor<4> {
        let c = x.dims()[1];
        let g = layer.groups;
        let normed = super::onednn::group_normalize(&x, g, GROUP_NORM_EPS)
            .unwrap_or_else(|| normalize_groups(x, g, GROUP_NORM_EPS));
        let gamma = layer.gamma.val().reshape([1, c, 1, 1]);
        let beta = layer.beta.val().reshape([1, c, 1, 1]);
        normed.mul(gamma).add(beta)
    }

    fn silu(&mut self, x: Tensor<4>) -> Tensor<4> {
        super::onednn::silu(&x).unwrap_or_else(|| silu(x))
    }

    fn add(&mut self, a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
        a.add(b)
    }

    fn add_per_channel(&mut self, x: Tensor<4>, v: Tensor<2>) -> Tensor<4> {
        let [n, c] = v.dims();
        x.add(v.reshape([n, c, 1, 1]))
    }

    fn concat_channels(&mut self, a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
        Tensor::cat(vec![a, b], 1)
    }

    fn upsample_nearest2x(&mut self, x: Tensor<4>) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        x.reshape([n, c, h, 1, w, 1]).expand([n, c, h, 2, w, 2]).reshape([n, c, 2 * h, 2 * w])
    }

    fn attend(&mut self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, channels: usize) -> Tensor<4> {
        let [n, c, h, w] = q.dims();
        let q = q.reshape([n, c, h * w]).swap_dims(1, 2);
        let k = k.reshape([n, c, h * w]);
        let v = v.reshape([n, c, h * w]);
        let scores = q.matmul(k).mul_scalar(1.0 / (channels as f32).sqrt());
        let weights = softmax(scores, 2);
        v.matmul(weights.swap_dims(1, 2)).reshape([n, c, h, w])
    }
}

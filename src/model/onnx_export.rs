//! Writes the UNet as an ONNX graph by interpreting [`UNet::walk`] with node emitters.
//!
//! Why not burn-onnx's exporter: it is trace-based, fails on `Sin` and `MeanDim`, and fixes
//! the batch size (see `docs/design.md`). Here every op of the walk maps to a few standard
//! ONNX ops at opset 17, the inputs have dynamic `N`, `H`, `W`, and initializers carry the
//! parameter paths of the burn module (`down.0.res.0.conv1.weight`).
//!
//! Graph contract: inputs `x_t: f32[N,C,H,W]`, `t: f32[N]` (timestep index, the time
//! embedding is computed in the graph); output `eps: f32[N,C,H,W]`.

use std::collections::HashMap;

use burn::module::Module;
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use onnx_ir::{AttributeProto, AttributeType, Message, ModelProto, NodeProto, TensorProto, ValueInfoProto};

use super::architecture::UNetConfig;
use super::unet::{GROUP_NORM_EPS, GroupNorm, UNet, UNetOps, embedding_frequencies};

pub const INPUT_IMAGE: &str = "x_t";
pub const INPUT_TIME: &str = "t";
pub const OUTPUT_EPS: &str = "eps";
pub const OPSET: i64 = 17;
/// IR version 8 is the one that opset 17 shipped with; ORT ≥ 1.14 reads it.
const IR_VERSION: i64 = 8;
const FLOAT: i32 = 1;
const INT64: i32 = 7;

/// Serialises the model as an ONNX `ModelProto`.
pub fn export_onnx(model: &UNet, config: &UNetConfig, producer_version: &str) -> Vec<u8> {
    let mut emitter = OnnxEmitter::default();
    let out = model.walk(&mut emitter, INPUT_IMAGE.to_string(), INPUT_TIME.to_string());
    emitter.push_node("Identity", &[&out], vec![], Some(OUTPUT_EPS.to_string()));

    model_proto(emitter, "rddpm_unet", config, producer_version)
}

/// The emitted nodes as a model whose `x_t`/`eps` have `config.channels` channels.
fn model_proto(emitter: OnnxEmitter, name: &str, config: &UNetConfig, producer_version: &str) -> Vec<u8> {
    let c = config.channels as i64;
    let image = [Dim::Param("N"), Dim::Value(c), Dim::Param("H"), Dim::Param("W")];
    let inputs = vec![value_info(INPUT_IMAGE, &image), value_info(INPUT_TIME, &[Dim::Param("N")])];
    graph_proto(emitter, name, inputs, vec![value_info(OUTPUT_EPS, &image)], producer_version)
}

/// The emitted nodes as a model with these graph inputs and outputs.
pub(super) fn graph_proto(
    emitter: OnnxEmitter,
    name: &str,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    producer_version: &str,
) -> Vec<u8> {
    let mut proto = ModelProto::new();
    proto.ir_version = IR_VERSION;
    proto.producer_name = "edge-inspect".into();
    proto.producer_version = producer_version.into();
    // OperatorSetIdProto is not re-exported by onnx-ir; build it through the Vec's type.
    proto.opset_import.push(Default::default());
    let opset = proto.opset_import.last_mut().expect("just pushed");
    opset.domain = String::new();
    opset.version = OPSET;

    let graph = proto.graph.mut_or_insert_default();
    graph.name = name.into();
    graph.node = emitter.nodes;
    graph.initializer = emitter.initializers;
    graph.input = inputs;
    graph.output = outputs;
    proto.write_to_bytes().expect("an in-memory ModelProto always serialises")
}

/// Serialises the feature distance of `model` (`Residual::Feature`): in the head's
/// contract, input `x_t: [N, 2C, H, W]` (frame ‖ reconstruction, channel-stacked) and `t: [N]`
/// (the timestep the encoder sees them at), output `eps: [N, 2C, H, W]` whose channels all
/// hold the map. Frame and reconstruction go through the UNet's own encoder as one batch;
/// at every down ResBlock the per-pixel cosine distance `1 − ⟨f, f̂⟩ / (‖f‖·‖f̂‖)` of their
/// features is resized (bilinear) to `H × W`, and the map is the mean over those levels.
pub fn export_feature_onnx(model: &UNet, config: &UNetConfig, producer_version: &str) -> Vec<u8> {
    let mut emitter = OnnxEmitter::default();
    let halves = emitter.node_outputs("Split", &[INPUT_IMAGE], vec![attr_int("axis", 1)], 2);
    let both = emitter.node("Concat", &[&halves[0], &halves[1]], vec![attr_int("axis", 0)]);
    let t = emitter.node("Concat", &[INPUT_TIME, INPUT_TIME], vec![attr_int("axis", 0)]);
    let features = model.walk_features(&mut emitter, both, t);
    let levels = features.len();
    let size = emitter.map_size(INPUT_IMAGE);
    let mut sum: Option<String> = None;
    for f in features {
        let d = emitter.cosine_distance(&f);
        let attrs = vec![attr_string("mode", "linear"), attr_string("coordinate_transformation_mode", "half_pixel")];
        let d = emitter.node("Resize", &[&d, "", "", &size], attrs);
        sum = Some(match sum {
            None => d,
            Some(s) => emitter.node("Add", &[&s, &d], vec![]),
        });
    }
    let mean_weight = emitter.float_constant(&[], &[1.0 / levels as f32]);
    let sum = sum.expect("a UNet has at least one level");
    let map = emitter.node("Mul", &[&sum, &mean_weight], vec![]);
    let shape = emitter.node("Shape", &[INPUT_IMAGE], vec![]);
    emitter.push_node("Expand", &[&map, &shape], vec![], Some(OUTPUT_EPS.to_string()));

    let pair = UNetConfig { channels: 2 * config.channels, ..config.clone() };
    model_proto(emitter, "unet_feature_distance", &pair, producer_version)
}

pub(super) enum Dim<'a> {
    Param(&'a str),
    Value(i64),
}

pub(super) fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let mut info = ValueInfoProto::new();
    info.name = name.into();
    let tensor = info.type_.mut_or_insert_default().mut_tensor_type();
    tensor.elem_type = FLOAT;
    let shape = tensor.shape.mut_or_insert_default();
    for d in dims {
        shape.dim.push(Default::default());
        let dim = shape.dim.last_mut().expect("just pushed");
        match d {
            Dim::Param(p) => dim.set_dim_param((*p).into()),
            Dim::Value(v) => dim.set_dim_value(*v),
        }
    }
    info
}

pub(super) fn attr_int(name: &str, value: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = value;
    a
}

pub(super) fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INTS.into();
    a.ints = values.to_vec();
    a
}

pub(super) fn attr_float(name: &str, value: f32) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::FLOAT.into();
    a.f = value;
    a
}

pub(super) fn attr_string(name: &str, value: &str) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::STRING.into();
    a.s = value.as_bytes().to_vec().into();
    a
}

fn to_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    let data = t.into_data();
    data.as_slice::<f32>().expect("UNet parameters are f32").to_vec()
}

/// Accumulates nodes and initializers while the walk runs.
#[derive(Default)]
pub(super) struct OnnxEmitter {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    /// Constants already emitted, by content key, so repeated shapes share one initializer.
    constants: HashMap<String, String>,
    counter: usize,
}

impl OnnxEmitter {
    pub(super) fn push_node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        output: Option<String>,
    ) -> String {
        self.counter += 1;
        let out = output.unwrap_or_else(|| format!("{}_{}", op.to_lowercase(), self.counter));
        let mut node = NodeProto::new();
        node.name = format!("{op}_{}", self.counter);
        node.op_type = op.into();
        node.input = inputs.iter().map(|s| s.to_string()).collect();
        node.output = vec![out.clone()];
        node.attribute = attrs;
        self.nodes.push(node);
        out
    }

    pub(super) fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.push_node(op, inputs, attrs, None)
    }

    /// A node with `n` outputs (e.g. an even `Split`).
    pub(super) fn node_outputs(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        n: usize,
    ) -> Vec<String> {
        let first = self.push_node(op, inputs, attrs, None);
        let node = self.nodes.last_mut().expect("just pushed");
        node.output = (0..n).map(|i| format!("{first}_{i}")).collect();
        node.output.clone()
    }

    /// `[N, 1, H, W]` of a `[N, C, H, W]` value, as an int64 shape tensor.
    pub(super) fn map_size(&mut self, x: &str) -> String {
        let shape = self.node("Shape", &[x], vec![]);
        let (zero, one, two, four) =
            (self.int_constant(&[0]), self.int_constant(&[1]), self.int_constant(&[2]), self.int_constant(&[4]));
        let batch = self.node("Slice", &[&shape, &zero, &one], vec![]);
        let spatial = self.node("Slice", &[&shape, &two, &four], vec![]);
        self.node("Concat", &[&batch, &one, &spatial], vec![attr_int("axis", 0)])
    }

    /// Per pixel, `1 − cos` between the two halves of the batch of `f [2N, C, h, w]`:
    /// `[N, 1, h, w]`.
    fn cosine_distance(&mut self, f: &str) -> String {
        let halves = self.node_outputs("Split", &[f], vec![attr_int("axis", 0)], 2);
        let channels = self.int_constant(&[1]);
        let channel_sum = |emitter: &mut Self, a: &str, b: &str| {
            let product = emitter.node("Mul", &[a, b], vec![]);
            emitter.node("ReduceSum", &[&product, &channels], vec![attr_int("keepdims", 1)])
        };
        let dot = channel_sum(self, &halves[0], &halves[1]);
        let norm_a = channel_sum(self, &halves[0], &halves[0]);
        let norm_b = channel_sum(self, &halves[1], &halves[1]);
        let norms = self.node("Mul", &[&norm_a, &norm_b], vec![]);
        let tiny = self.float_constant(&[], &[1e-12]);
        let norms = self.node("Add", &[&norms, &tiny], vec![]);
        let norms = self.node("Sqrt", &[&norms], vec![]);
        let cosine = self.node("Div", &[&dot, &norms], vec![]);
        let one = self.float_constant(&[], &[1.0]);
        self.node("Sub", &[&one, &cosine], vec![])
    }

    pub(super) fn float_initializer(&mut self, name: &str, dims: &[usize], values: Vec<f32>) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), values.len(), "{name}");
        let mut t = TensorProto::new();
        t.name = name.into();
        t.data_type = FLOAT;
        t.dims = dims.iter().map(|d| *d as i64).collect();
        t.float_data = values;
        self.initializers.push(t);
        name.to_string()
    }

    pub(super) fn int_constant(&mut self, values: &[i64]) -> String {
        let key = format!("i64:{values:?}");
        if let Some(name) = self.constants.get(&key) {
            return name.clone();
        }
        let name = format!("const_{}", self.constants.len());
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = INT64;
        t.dims = vec![values.len() as i64];
        t.int64_data = values.to_vec();
        self.initializers.push(t);
        self.constants.insert(key, name.clone());
        name
    }

    pub(super) fn float_constant(&mut self, dims: &[usize], values: &[f32]) -> String {
        let key = format!("f32:{dims:?}:{:?}", values.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        if let Some(name) = self.constants.get(&key) {
            return name.clone();
        }
        let name = format!("const_{}", self.constants.len());
        self.float_initializer(&name, dims, values.to_vec());
        self.constants.insert(key, name.clone());
        name
    }
}

impl UNetOps for OnnxEmitter {
    type Map = String;
    type Vector = String;
    type Time = String;

    fn timestep_embedding(&mut self, t: String, dim: usize) -> String {
        let freqs = embedding_frequencies(dim);
        let freqs = self.float_constant(&[1, freqs.len()], &freqs);
        let column = self.int_constant(&[-1, 1]);
        let t = self.node("Reshape", &[&t, &column], vec![]);
        let args = self.node("Mul", &[&t, &freqs], vec![]);
        let sin = self.node("Sin", &[&args], vec![]);
        let cos = self.node("Cos", &[&args], vec![]);
        self.node("Concat", &[&sin, &cos], vec![attr_int("axis", 1)])
    }

    fn linear(&mut self, name: &str, layer: &Linear, x: String) -> String {
        let weight = layer.weight.val();
        let [d_in, d_out] = weight.dims();
        let w = self.float_initializer(&format!("{name}.weight"), &[d_in, d_out], to_f32(weight));
        let mut inputs = vec![x, w];
        if let Some(bias) = &layer.bias {
            inputs.push(self.float_initializer(&format!("{name}.bias"), &[d_out], to_f32(bias.val())));
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.node("Gemm", &inputs, vec![])
    }

    fn silu_vector(&mut self, x: String) -> String {
        self.silu(x)
    }

    fn conv(&mut self, name: &str, layer: &Conv2d, x: String) -> String {
        let weight = layer.weight.val();
        let dims = weight.dims();
        let w = self.float_initializer(&format!("{name}.weight"), &dims, to_f32(weight));
        let mut inputs = vec![x, w];
        if let Some(bias) = &layer.bias {
            inputs.push(self.float_initializer(&format!("{name}.bias"), &[dims[0]], to_f32(bias.val())));
        }
        let pads = match layer.padding {
            burn::nn::PaddingConfig2d::Explicit(top, left, bottom, right) => [top, left, bottom, right],
            ref other => unreachable!("the UNet only builds explicit padding, found {other:?}"),
        };
        let attrs = vec![
            attr_ints("kernel_shape", &[dims[2] as i64, dims[3] as i64]),
            attr_ints("strides", &[layer.stride[0] as i64, layer.stride[1] as i64]),
            // ONNX order: [x1_begin, x2_begin, x1_end, x2_end].
            attr_ints("pads", &[pads[0] as i64, pads[1] as i64, pads[2] as i64, pads[3] as i64]),
        ];
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.node("Conv", &inputs, attrs)
    }

    /// Lowered as PyTorch does before opset 18: InstanceNormalization over `[N, G, −1]`.
    fn group_norm(&mut self, name: &str, layer: &GroupNorm, x: String) -> String {
        let channels = layer.gamma.dims()[0];
        let groups = layer.groups;
        let grouped_shape = self.int_constant(&[0, groups as i64, -1]);
        let grouped = self.node("Reshape", &[&x, &grouped_shape], vec![]);
        let ones = self.float_constant(&[groups], &vec![1.0; groups]);
        let zeros = self.float_constant(&[groups], &vec![0.0; groups]);
        let normed =
            self.node("InstanceNormalization", &[&grouped, &ones, &zeros], vec![attr_float("epsilon", GROUP_NORM_EPS)]);
        let shape = self.node("Shape", &[&x], vec![]);
        let normed = self.node("Reshape", &[&normed, &shape], vec![]);
        let gamma = self.float_initializer(&format!("{name}.gamma"), &[1, channels, 1, 1], to_f32(layer.gamma.val()));
        let beta = self.float_initializer(&format!("{name}.beta"), &[1, channels, 1, 1], to_f32(layer.beta.val()));
        let scaled = self.node("Mul", &[&normed, &gamma], vec![]);
        self.node("Add", &[&scaled, &beta], vec![])
    }

    fn silu(&mut self, x: String) -> String {
        let gate = self.node("Sigmoid", &[&x], vec![]);
        self.node("Mul", &[&x, &gate], vec![])
    }

    fn add(&mut self, a: String, b: String) -> String {
        self.node("Add", &[&a, &b], vec![])
    }

    fn add_per_channel(&mut self, x: String, v: String) -> String {
        let shape = self.int_constant(&[0, 0, 1, 1]);
        let v = self.node("Reshape", &[&v, &shape], vec![]);
        self.node("Add", &[&x, &v], vec![])
    }

    fn concat_channels(&mut self, a: String, b: String) -> String {
        self.node("Concat", &[&a, &b], vec![attr_int("axis", 1)])
    }

    fn upsample_nearest2x(&mut self, x: String) -> String {
        let scales = self.float_constant(&[4], &[1.0, 1.0, 2.0, 2.0]);
        let attrs = vec![
            attr_string("mode", "nearest"),
            attr_string("coordinate_transformation_mode", "asymmetric"),
            attr_string("nearest_mode", "floor"),
        ];
        self.node("Resize", &[&x, "", &scales], attrs)
    }

    fn attend(&mut self, q: String, k: String, v: String, channels: usize) -> String {
        let flat = self.int_constant(&[0, channels as i64, -1]);
        let out_shape = self.node("Shape", &[&q], vec![]);
        let q = self.node("Reshape", &[&q, &flat], vec![]);
        let q = self.node("Transpose", &[&q], vec![attr_ints("perm", &[0, 2, 1])]);
        let k = self.node("Reshape", &[&k, &flat], vec![]);
        let v = self.node("Reshape", &[&v, &flat], vec![]);
        let scores = self.node("MatMul", &[&q, &k], vec![]);
        let scale = self.float_constant(&[], &[1.0 / (channels as f32).sqrt()]);
        let scores = self.node("Mul", &[&scores, &scale], vec![]);
        let weights = self.node("Softmax", &[&scores], vec![attr_int("axis", -1)]);
        let weights = self.node("Transpose", &[&weights], vec![attr_ints("perm", &[0, 2, 1])]);
        let out = self.node("MatMul", &[&v, &weights], vec![]);
        self.node("Reshape", &[&out, &out_shape], vec![])
    }
}

/// Sets every parameter of `model` from the initializer of the same path in an exported
/// graph (`retrain --init`): the bundle's ONNX file is also its weight file.
pub fn import_weights(model: UNet, onnx: &[u8]) -> Result<UNet, String> {
    let proto = ModelProto::parse_from_bytes(onnx).map_err(|e| format!("not an ONNX model: {e}"))?;
    let graph = proto.graph.as_ref().ok_or("the ONNX model has no graph")?;
    let initializers: HashMap<&str, &TensorProto> = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut importer = WeightImporter { initializers, path: Vec::new(), error: None };
    let model = model.map(&mut importer);
    match importer.error {
        Some(e) => Err(e),
        None => Ok(model),
    }
}

/// Walks the module tree keeping the dotted parameter path (`down.0.res.0.conv1`).
struct WeightImporter<'a> {
    initializers: HashMap<&'a str, &'a TensorProto>,
    path: Vec<String>,
    error: Option<String>,
}

impl burn::module::ModuleMapper for WeightImporter<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: burn::module::Param<Tensor<D>>) -> burn::module::Param<Tensor<D>> {
        let name = self.path.join(".");
        let Some(init) = self.initializers.get(name.as_str()) else {
            self.error.get_or_insert_with(|| format!("the ONNX graph has no initializer '{name}'"));
            return param;
        };
        let expected: usize = param.shape().num_elements();
        if init.float_data.len() != expected {
            self.error.get_or_insert_with(|| {
                format!("initializer '{name}' has {} values, the model expects {expected}", init.float_data.len())
            });
            return param;
        }
        let values = init.float_data.clone();
        param.map(|t| {
            let loaded = Tensor::from_data(burn::tensor::TensorData::new(values, t.shape()), &t.device());
            // A fresh tensor does not track gradients; keep the parameter trainable.
            if t.is_require_grad() { loaded.require_grad() } else { loaded }
        })
    }
}

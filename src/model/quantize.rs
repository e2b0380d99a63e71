//! Static int8 quantisation of an emitted graph, in ONNX's QDQ form: the observer graph
//! that exposes what calibration must measure, the activation ranges it measured, and the
//! rewrite that puts `QuantizeLinear`/`DequantizeLinear` around every convolution.
//!
//! Written here rather than taken from a crate: no Rust crate quantises ONNX graphs (ORT's
//! quantiser is Python), and the rewrite is small because the graphs are our own emitter's
//! (every `Conv` weight and bias is a float initializer).
//!
//! The form is the one ORT's CPU provider fuses into `QLinearConv` (u8 activations, s8
//! weights, VNNI where the CPU has it): `Q → DQ` on the convolution's input, per-output-
//! channel symmetric 7-bit weights behind a `DQ` (axis 0; see [`WEIGHT_MAX`]), the bias as
//! int32 at the scale `s_x · s_w[c]` (zero point 0), and `Q → DQ` on its output. Everything
//! between two convolutions (norms, activations, attention, distances) stays in f32.

use std::collections::{BTreeMap, HashMap, HashSet};

use onnx_ir::{Message, ModelProto, NodeProto, TensorProto, ValueInfoProto};

use super::onnx_export::attr_int;

const FLOAT: i32 = 1;
const UINT8: i32 = 2;
const INT8: i32 = 3;
const INT32: i32 = 6;

/// The observed range of each tensor that the quantised graph needs a scale for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ranges(BTreeMap<String, (f32, f32)>);

impl Ranges {
    /// Widens `name`'s range by `values` (non-finite values are not ranges: skipped).
    pub fn observe(&mut self, name: &str, values: &[f32]) {
        let finite = values.iter().copied().filter(|v| v.is_finite());
        let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if lo > hi {
            return;
        }
        let entry = self.0.entry(name.to_string()).or_insert((lo, hi));
        *entry = (entry.0.min(lo), entry.1.max(hi));
    }

    fn get(&self, name: &str) -> Result<(f32, f32), String> {
        self.0.get(name).copied().ok_or_else(|| format!("calibration observed no values of tensor '{name}'"))
    }
}

/// The graph with every tensor that [`quantize`] needs a range for added as an output, and
/// those tensors' names. `skip` lists weight-initializer prefixes whose convolutions stay
/// f32 (e.g. a whitening whose output is squared into a distance).
pub fn observer(onnx: &[u8], skip: &[&str]) -> Result<(Vec<u8>, Vec<String>), String> {
    let mut proto = parse(onnx)?;
    let graph = proto.graph.mut_or_insert_default();
    let mut names = Vec::new();
    let mut seen = HashSet::new();
    for node in graph.node.iter().filter(|n| quantized_conv(n, skip)) {
        for name in [&node.input[0], &node.output[0]] {
            if seen.insert(name.clone()) {
                names.push(name.clone());
            }
        }
    }
    let existing: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    for name in names.iter().filter(|n| !existing.contains(*n)) {
        graph.output.push(float_output(name));
    }
    Ok((proto.write_to_bytes().map_err(|e| e.to_string())?, names))
}

/// The graph in QDQ form with the activation scales of `ranges` (from running
/// [`observer`]'s graph on calibration inputs).
pub fn quantize(onnx: &[u8], ranges: &Ranges, skip: &[&str]) -> Result<Vec<u8>, String> {
    let mut proto = parse(onnx)?;
    let graph = proto.graph.mut_or_insert_default();
    let mut rewrite = Rewrite {
        floats: graph
            .initializer
            .iter()
            .map(|t| Ok((t.name.clone(), (t.dims.clone(), floats_of(t)?))))
            .collect::<Result<_, String>>()?,
        ranges,
        nodes: Vec::new(),
        initializers: Vec::new(),
        dequantized: HashMap::new(),
    };
    let mut quantized_weights = HashSet::new();
    for node in std::mem::take(&mut graph.node) {
        if quantized_conv(&node, skip) {
            quantized_weights.extend(node.input.iter().skip(1).cloned());
            rewrite.conv(node)?;
        } else {
            rewrite.nodes.push(node);
        }
    }
    // A float weight still read by another node stays; the rest now lives as int8.
    let still_read: HashSet<&String> = rewrite.nodes.iter().flat_map(|n| n.input.iter()).collect();
    graph.initializer.retain(|t| !quantized_weights.contains(&t.name) || still_read.contains(&t.name));
    graph.initializer.extend(rewrite.initializers);
    graph.node = rewrite.nodes;
    proto.write_to_bytes().map_err(|e| e.to_string())
}

fn parse(onnx: &[u8]) -> Result<ModelProto, String> {
    ModelProto::parse_from_bytes(onnx).map_err(|e| format!("not an ONNX model: {e}"))
}

/// A convolution whose weight is an initializer not under a `skip` prefix.
fn quantized_conv(node: &NodeProto, skip: &[&str]) -> bool {
    node.op_type == "Conv" && node.input.len() >= 2 && !skip.iter().any(|p| node.input[1].starts_with(p))
}

fn float_output(name: &str) -> ValueInfoProto {
    let mut info = ValueInfoProto::new();
    info.name = name.into();
    info.type_.mut_or_insert_default().mut_tensor_type().elem_type = FLOAT;
    info
}

/// The f32 values of an initializer (either of ONNX's two encodings), or none for another type.
pub(super) fn floats_of(t: &TensorProto) -> Result<Option<Vec<f32>>, String> {
    if t.data_type != FLOAT {
        return Ok(None);
    }
    if !t.float_data.is_empty() || t.raw_data.is_empty() {
        return Ok(Some(t.float_data.clone()));
    }
    if !t.raw_data.len().is_multiple_of(4) {
        return Err(format!("initializer '{}' has {} raw bytes, not whole f32s", t.name, t.raw_data.len()));
    }
    Ok(Some(t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()))
}

/// u8 asymmetric scale and zero point covering `[lo, hi]` and 0.
fn activation_params((lo, hi): (f32, f32)) -> (f32, u8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    (scale, (-lo / scale).round().clamp(0.0, 255.0) as u8)
}

fn bytes_i8(values: &[i8]) -> Vec<u8> {
    values.iter().map(|v| *v as u8).collect()
}

/// The largest weight magnitude: 7 bits, not 8 (ORT's `reduce_range`). On x86 CPUs without
/// VNNI, MLAS multiplies u8 activations by s8 weights in pairs summed into 16 bits
/// (`vpmaddubsw`), which saturates at 255 · 127 · 2; at 63 the pair sums stay within i16.
/// Measured on an AVX2-only EPYC: 8-bit weights put the small UNet's int8 output 42 % away
/// from f32, 7-bit ones 5.5 % (`model_core::an_int8_graph…`).
const WEIGHT_MAX: f32 = 63.0;

/// Symmetric int8 per-output-channel weights in ±[`WEIGHT_MAX`]: the values and each
/// channel's scale.
fn quantize_weights(w: &[f32], out_channels: usize) -> (Vec<i8>, Vec<f32>) {
    let per = w.len() / out_channels;
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(out_channels);
    for channel in w.chunks_exact(per) {
        let max = channel.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = if max > 0.0 { max / WEIGHT_MAX } else { 1.0 };
        q.extend(channel.iter().map(|v| (v / scale).round().clamp(-WEIGHT_MAX, WEIGHT_MAX) as i8));
        scales.push(scale);
    }
    (q, scales)
}

struct Rewrite<'a> {
    /// Every initializer's dims, and its values where it is f32.
    floats: HashMap<String, (Vec<i64>, Option<Vec<f32>>)>,
    ranges: &'a Ranges,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    /// Tensor → (its dequantised copy, its scale), so a tensor read by several convolutions
    /// is quantised once.
    dequantized: HashMap<String, (String, f32)>,
}

impl Rewrite<'_> {
    /// `DQ(Q(x)) → Conv(DQ(w), DQ(b)) → Q → DQ`, keeping the output's name for its readers.
    fn conv(&mut self, mut node: NodeProto) -> Result<(), String> {
        let (x, x_scale) = self.quantize_activation(&node.input[0])?;
        let weight_name = node.input[1].clone();
        let (dims, w) = self.float_values(&weight_name)?;
        let out_channels = dims.first().copied().unwrap_or(0) as usize;
        if out_channels == 0 || w.len() % out_channels != 0 {
            return Err(format!("conv weight '{weight_name}' has {} values for {out_channels} channels", w.len()));
        }
        let (wq, w_scales) = quantize_weights(&w, out_channels);
        let wq_name = self.raw_initializer(&format!("{weight_name}_q"), INT8, &dims, bytes_i8(&wq));
        let w_dq = self.dequantize_channels(&wq_name, &w_scales, INT8);
        node.input[0] = x;
        node.input[1] = w_dq;
        if let Some(bias_name) = node.input.get(2).filter(|b| !b.is_empty()).cloned() {
            let (_, b) = self.float_values(&bias_name)?;
            let scales: Vec<f32> = w_scales.iter().map(|s| s * x_scale).collect();
            let bq: Vec<i32> = b.iter().zip(&scales).map(|(v, s)| (v / s).round() as i32).collect();
            let bytes = bq.iter().flat_map(|v| v.to_le_bytes()).collect();
            let bq_name = self.raw_initializer(&format!("{bias_name}_q"), INT32, &[bq.len() as i64], bytes);
            node.input[2] = self.dequantize_channels(&bq_name, &scales, INT32);
        }
        let output = node.output[0].clone();
        let raw = format!("{output}_f32");
        node.output[0] = raw.clone();
        self.nodes.push(node);
        let scale = self.round_trip(&raw, self.ranges.get(&output)?, &output);
        self.dequantized.insert(output.clone(), (output, scale));
        Ok(())
    }

    /// `x`'s dequantised copy (made once) and its scale.
    fn quantize_activation(&mut self, x: &str) -> Result<(String, f32), String> {
        if let Some(done) = self.dequantized.get(x) {
            return Ok(done.clone());
        }
        let out = format!("{x}_dq");
        let scale = self.round_trip(x, self.ranges.get(x)?, &out);
        self.dequantized.insert(x.to_string(), (out.clone(), scale));
        Ok((out, scale))
    }

    /// `out = DQ(Q(x))` at the u8 scale of `range`; returns the scale.
    fn round_trip(&mut self, x: &str, range: (f32, f32), out: &str) -> f32 {
        let (scale, zero) = activation_params(range);
        let s = self.float_initializer(&format!("{x}_scale"), &[], &[scale]);
        let z = self.raw_initializer(&format!("{x}_zero"), UINT8, &[], vec![zero]);
        let q = self.push("QuantizeLinear", &[x, &s, &z], format!("{x}_q"), vec![]);
        self.push("DequantizeLinear", &[&q, &s, &z], out.to_string(), vec![]);
        scale
    }

    /// `DequantizeLinear` of an integer initializer with per-output-channel `scales`.
    fn dequantize_channels(&mut self, q: &str, scales: &[f32], data_type: i32) -> String {
        let n = scales.len() as i64;
        let s = self.float_initializer(&format!("{q}_scale"), &[n], scales);
        let width = if data_type == INT32 { 4 } else { 1 };
        let z = self.raw_initializer(&format!("{q}_zero"), data_type, &[n], vec![0; scales.len() * width]);
        self.push("DequantizeLinear", &[q, &s, &z], format!("{q}_dq"), vec![attr_int("axis", 0)])
    }

    fn push(&mut self, op: &str, inputs: &[&str], output: String, attrs: Vec<onnx_ir::AttributeProto>) -> String {
        let mut node = NodeProto::new();
        node.name = format!("{op}_{output}");
        node.op_type = op.into();
        node.input = inputs.iter().map(|s| s.to_string()).collect();
        node.output = vec![output.clone()];
        node.attribute = attrs;
        self.nodes.push(node);
        output
    }

    fn float_initializer(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        self.raw_initializer(name, FLOAT, dims, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// An initializer of `data_type` from its little-endian bytes.
    fn raw_initializer(&mut self, name: &str, data_type: i32, dims: &[i64], raw: Vec<u8>) -> String {
        let mut t = TensorProto::new();
        t.name = name.into();
        t.data_type = data_type;
        t.dims = dims.to_vec();
        t.raw_data = raw.into();
        self.initializers.push(t);
        name.to_string()
    }

    /// The dims and values of an f32 initializer.
    fn float_values(&self, name: &str) -> Result<(Vec<i64>, Vec<f32>), String> {
        match self.floats.get(name) {
            Some((dims, Some(values))) => Ok((dims.clone(), values.clone())),
            _ => Err(format!("conv input '{name}' is not an f32 initializer: only the emitter's graphs are quantised")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The saturation drill without a CPU that lacks VNNI: two u8 activations times two
    /// weights, as `vpmaddubsw` adds them, must fit in i16 for every weight made, the
    /// channel's largest included (8-bit weights reached 255 · 127 · 2 = 64770).
    #[test]
    fn weight_pairs_times_u8_activations_fit_in_sixteen_bits() {
        let w: Vec<f32> = (0..64).map(|i| (i as f32 * 0.7).sin() * if i < 32 { 1.0 } else { 0.01 }).collect();
        let (q, scales) = quantize_weights(&w, 2);
        let largest = q.iter().map(|v| i32::from(*v).abs()).max().unwrap();
        assert!(255 * largest * 2 <= i32::from(i16::MAX), "largest weight {largest}");
        assert_eq!(largest, WEIGHT_MAX as i32, "each channel's largest weight takes the whole range");
        // Each channel keeps its own scale, and the values come back within half a step.
        for (c, (w, q)) in w.chunks(32).zip(q.chunks(32)).enumerate() {
            for (v, qv) in w.iter().zip(q) {
                assert!((v - f32::from(*qv) * scales[c]).abs() <= scales[c] / 2.0 + 1e-7, "channel {c}: {v} vs {qv}");
            }
        }
    }
}

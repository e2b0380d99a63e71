//! fp16 copies of an emitted graph, for GPU providers (CUDA's and TensorRT's fp16 kernels):
//! which nodes run in half precision, the casts where f32 and f16 meet, and the f16 copies
//! of the weights.
//!
//! Written here rather than taken from a crate: no Rust crate converts ONNX graphs (the
//! usual converter, `onnxconverter-common`, is Python), and the rule is small because the
//! graphs are our own emitter's. It is not "everything in f16": two parts stay f32 because
//! half precision breaks them.
//! - The timestep branch — every node that does not depend on the frame input `x_t`. Its
//!   sinusoidal embedding takes `sin`/`cos` of arguments up to about 1000, where f16 has a
//!   spacing of 0.5: the embedding would be noise. It is a handful of small matrix products.
//! - Everything from a reduction on (`ReduceSum` and what reads it): the patch model's
//!   squared Mahalanobis distance sums hundreds of channels and can pass f16's 65504.
//!
//! Integer tensors (shapes, indices) are never cast, and `Resize`'s `roi` and `scales`
//! stay f32 as ONNX requires.

use std::collections::{BTreeMap, HashMap, HashSet};

use half::f16;
use onnx_ir::{Message, ModelProto, NodeProto, TensorProto};

use super::onnx_export::attr_int;

const FLOAT: i32 = 1;
const FLOAT16: i32 = 10;

/// The frame input of every emitted graph; what does not depend on it stays f32.
const FRAME_INPUT: &str = "x_t";

/// The graph with its frame path in f16 (see the module doc); inputs and outputs stay f32,
/// so the runtime feeds and reads it as before.
pub fn to_fp16(onnx: &[u8]) -> Result<Vec<u8>, String> {
    let mut proto = ModelProto::parse_from_bytes(onnx).map_err(|e| format!("not an ONNX model: {e}"))?;
    let graph = proto.graph.mut_or_insert_default();
    if !graph.input.iter().any(|i| i.name == FRAME_INPUT) {
        return Err(format!("the graph has no '{FRAME_INPUT}' input: only the emitter's graphs are converted"));
    }
    let initializers: HashMap<String, TensorProto> =
        graph.initializer.iter().map(|t| (t.name.clone(), t.clone())).collect();
    let plan = Plan::of(
        &graph.node,
        graph.input.iter().map(|i| (i.name.as_str(), i.type_.tensor_type().elem_type)),
        &initializers,
    );
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let mut rewrite = Rewrite {
        plan: &plan,
        initializers: &initializers,
        nodes: Vec::new(),
        added: BTreeMap::new(),
        casts: HashMap::new(),
    };
    for (index, node) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        rewrite.node(node, plan.half_nodes.contains(&index))?;
    }
    // A graph output computed in f16 is cast back under its own name.
    for node in &mut rewrite.nodes {
        for out in node.output.iter_mut().filter(|o| outputs.contains(*o) && plan.half.contains(*o)) {
            *out = format!("{out}_f16");
        }
        for input in node.input.iter_mut().filter(|i| outputs.contains(*i) && plan.half.contains(*i)) {
            *input = format!("{input}_f16");
        }
    }
    for name in outputs.iter().filter(|o| plan.half.contains(*o)) {
        rewrite.nodes.push(cast(&format!("{name}_f16"), name, FLOAT));
    }
    graph.node = rewrite.nodes;
    // An f32 weight that only f16 nodes read now lives as its f16 copy.
    let still_read: HashSet<&String> = graph.node.iter().flat_map(|n| n.input.iter()).collect();
    graph.initializer.retain(|t| still_read.contains(&t.name));
    graph.initializer.extend(rewrite.added.into_values());
    // Intermediate type annotations would now be wrong; ORT infers them.
    graph.value_info.clear();
    proto.write_to_bytes().map_err(|e| e.to_string())
}

/// Which tensors are floating point, which nodes run in f16 and which tensors they make.
struct Plan {
    float: HashSet<String>,
    half: HashSet<String>,
    half_nodes: HashSet<usize>,
}

impl Plan {
    /// In one pass over the nodes (ONNX keeps them in topological order).
    fn of<'a>(
        nodes: &[NodeProto],
        inputs: impl Iterator<Item = (&'a str, i32)>,
        initializers: &HashMap<String, TensorProto>,
    ) -> Self {
        let mut float: HashSet<String> = inputs.filter(|(_, t)| *t == FLOAT).map(|(n, _)| n.to_string()).collect();
        float.extend(initializers.values().filter(|t| t.data_type == FLOAT).map(|t| t.name.clone()));
        let mut from_frame: HashSet<String> = HashSet::from([FRAME_INPUT.to_string()]);
        let mut after_reduction: HashSet<String> = HashSet::new();
        let (mut half, mut half_nodes) = (HashSet::new(), HashSet::new());
        for (index, node) in nodes.iter().enumerate() {
            let reads = |set: &HashSet<String>| node.input.iter().any(|i| set.contains(i));
            // Shapes are integers whatever they measure; otherwise a node's output has its
            // data input's type (every op the emitter writes keeps it).
            let makes_float = node.op_type != "Shape" && node.input.first().is_some_and(|i| float.contains(i));
            let reduced = node.op_type.starts_with("Reduce") || reads(&after_reduction);
            let is_half = makes_float && reads(&from_frame) && !reduced;
            for out in &node.output {
                if makes_float {
                    float.insert(out.clone());
                }
                if reads(&from_frame) {
                    from_frame.insert(out.clone());
                }
                if reduced {
                    after_reduction.insert(out.clone());
                }
                if is_half {
                    half.insert(out.clone());
                }
            }
            if is_half {
                half_nodes.insert(index);
            }
        }
        Self { float, half, half_nodes }
    }
}

/// Inputs of an op that ONNX types as f32 whatever the data's type.
fn stays_f32(op: &str, position: usize) -> bool {
    op == "Resize" && (position == 1 || position == 2)
}

struct Rewrite<'a> {
    plan: &'a Plan,
    initializers: &'a HashMap<String, TensorProto>,
    nodes: Vec<NodeProto>,
    /// f16 copies of weights by name, made once each (ordered: the file's bytes are
    /// reproducible).
    added: BTreeMap<String, TensorProto>,
    /// (tensor, target type) → the cast's output, made once each.
    casts: HashMap<(String, i32), String>,
}

impl Rewrite<'_> {
    /// Pushes `node`, reading each floating-point input in the precision the node runs in.
    fn node(&mut self, mut node: NodeProto, half: bool) -> Result<(), String> {
        for position in 0..node.input.len() {
            let name = node.input[position].clone();
            if name.is_empty() || !self.plan.float.contains(&name) {
                continue;
            }
            let want_half = half && !stays_f32(&node.op_type, position);
            let is_half = self.plan.half.contains(&name);
            node.input[position] = match (want_half, is_half) {
                (true, false) if self.initializers.contains_key(&name) => self.weight(&name)?,
                (true, false) => self.cast(&name, FLOAT16),
                (false, true) => self.cast(&name, FLOAT),
                _ => name,
            };
        }
        if half && node.op_type == "Cast" {
            for a in node.attribute.iter_mut().filter(|a| a.name == "to" && a.i == FLOAT as i64) {
                a.i = FLOAT16 as i64;
            }
        }
        self.nodes.push(node);
        Ok(())
    }

    /// The f16 copy of a float initializer.
    fn weight(&mut self, name: &str) -> Result<String, String> {
        let copy = format!("{name}_f16");
        if self.added.contains_key(&copy) {
            return Ok(copy);
        }
        let source = &self.initializers[name];
        let values = super::quantize::floats_of(source)?.expect("a float initializer");
        let mut t = TensorProto::new();
        t.name = copy.clone();
        t.data_type = FLOAT16;
        t.dims = source.dims.clone();
        t.raw_data = values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect::<Vec<u8>>().into();
        self.added.insert(copy.clone(), t);
        Ok(copy)
    }

    /// `name` cast to `to` (made once per tensor and type).
    fn cast(&mut self, name: &str, to: i32) -> String {
        let key = (name.to_string(), to);
        if let Some(done) = self.casts.get(&key) {
            return done.clone();
        }
        let out = format!("{name}_{}", if to == FLOAT16 { "f16" } else { "f32" });
        self.nodes.push(cast(name, &out, to));
        self.casts.insert(key, out.clone());
        out
    }
}

fn cast(input: &str, output: &str, to: i32) -> NodeProto {
    let mut node = NodeProto::new();
    node.name = format!("Cast_{output}");
    node.op_type = "Cast".into();
    node.input = vec![input.to_string()];
    node.output = vec![output.to_string()];
    node.attribute = vec![attr_int("to", to as i64)];
    node
}

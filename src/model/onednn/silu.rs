//! SiLU, `x·sigmoid(x)`, as oneDNN's swish: one pass forward and one backward, where burn
//! composes it from a sigmoid and a product and differentiates both.

use std::ffi::{c_char, c_int};

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;

use super::{FlexFloat, assert_len, checked, contiguous, on_flex, output, threads, values};

// The shim's functions (`native/onednn.cpp`), declared with the C types it defines them with;
// a change there must change these.
unsafe extern "C" {
    fn ei_swish_forward(
        elements: i64,
        threads: c_int,
        src: *const f32,
        dst: *mut f32,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn ei_swish_backward(
        elements: i64,
        threads: c_int,
        src: *const f32,
        diff_dst: *const f32,
        diff_src: *mut f32,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

fn forward(x: &FlexTensor) -> FlexTensor {
    let x = contiguous(x);
    let src = values(&x);
    let mut out = output(x.shape());
    let dst = out.storage_mut::<f32>();
    assert_len("SiLU output", dst, src.len());
    // SAFETY: `src` and `dst` are contiguous f32 buffers of `src.len()` values (asserted
    // above), alive for the call, `dst` the only one written; the shim keeps no pointer.
    checked("SiLU forward", |error, len| unsafe {
        ei_swish_forward(src.len() as i64, threads(), src.as_ptr(), dst.as_mut_ptr(), error, len)
    });
    out
}

fn input_gradient(x: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
    let (x, grad) = (contiguous(x), contiguous(grad));
    let src = values(&x);
    let mut out = output(x.shape());
    let diff_src = out.storage_mut::<f32>();
    assert_len("SiLU output gradient", values(&grad), src.len());
    assert_len("SiLU input gradient", diff_src, src.len());
    // SAFETY: as in `forward`: lengths asserted above, buffers alive for the call,
    // `diff_src` the only one written.
    checked("SiLU backward", |error, len| unsafe {
        ei_swish_backward(
            src.len() as i64,
            threads(),
            src.as_ptr(),
            values(&grad).as_ptr(),
            diff_src.as_mut_ptr(),
            error,
            len,
        )
    });
    out
}

#[derive(Debug)]
struct SiluBackward;

impl Backward<Flex, 1> for SiluBackward {
    /// The checkpointed input.
    type State = NodeId;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let x: FlexTensor = checkpointer.retrieve_node_output(ops.state);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, input_gradient(&x, &grad));
        }
    }
}

/// SiLU of `x` by oneDNN, or `None` if `x` is not an f32 tensor on Flex.
pub fn silu<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
    Some(
        match on_flex(x)? {
            FlexFloat::Tracked(x) => FlexFloat::Tracked(
                match SiluBackward.prepare::<NoCheckpointing>([x.node()]).compute_bound().stateful() {
                    OpsKind::Tracked(mut prep) => {
                        let state = prep.checkpoint(&x);
                        prep.finish(state, forward(x.primitive()))
                    }
                    OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive())),
                },
            ),
            FlexFloat::Plain(x) => FlexFloat::Plain(forward(&x)),
        }
        .into_tensor(),
    )
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation;
    use burn::tensor::{Device, Distribution, Tensor};

    #[test]
    fn matches_burns_silu_forward_and_backward() {
        let device = Device::flex().autodiff();
        let x = Tensor::<4>::random([3, 5, 7, 9], Distribution::Uniform(-6.0, 6.0), &device).require_grad();
        let up = Tensor::<4>::random([3, 5, 7, 9], Distribution::Uniform(-1.0, 1.0), &device);
        let ours = super::silu(&x).expect("Flex autodiff is covered");
        let burns = activation::silu(x.clone());
        let forward: f32 = ours.clone().sub(burns.clone()).abs().max().into_scalar();
        assert!(forward < 1e-5, "forward differs by {forward}");
        let (ours, burns) = (ours.mul(up.clone()).sum().backward(), burns.mul(up).sum().backward());
        let gradient: f32 = x.grad(&ours).unwrap().sub(x.grad(&burns).unwrap()).abs().max().into_scalar();
        assert!(gradient < 1e-5, "input gradient differs by {gradient}");
    }
}

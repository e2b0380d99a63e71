//! GroupNorm's normalisation (the affine part stays in burn): each (sample, group) run of
//! an NCHW tensor — contiguous, because a group's channels are adjacent — minus its mean,
//! divided by `sqrt(variance + eps)`. oneDNN 2.6 has no group normalisation, so the shim
//! runs it as batch normalisation of the `[1, N·G, L, 1]` view, which computes exactly that.

use std::ffi::{c_char, c_int};

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::tensor::{Shape, Tensor};

use super::{FlexFloat, assert_len, checked, contiguous, on_flex, output, threads, values};

// The shim's functions (`native/onednn.cpp`), declared with the C types it defines them with;
// a change there must change these.
unsafe extern "C" {
    fn ei_normalise_forward(
        runs: i64,
        length: i64,
        epsilon: f32,
        threads: c_int,
        src: *const f32,
        dst: *mut f32,
        mean: *mut f32,
        variance: *mut f32,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn ei_normalise_backward(
        runs: i64,
        length: i64,
        epsilon: f32,
        threads: c_int,
        src: *const f32,
        mean: *const f32,
        variance: *const f32,
        diff_dst: *const f32,
        diff_src: *mut f32,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// How the tensor splits into normalised runs.
#[derive(Clone, Copy, Debug)]
struct Runs {
    count: i64,
    length: i64,
    epsilon: f32,
}

/// The normalised tensor and the statistics its backward pass needs.
struct Normalised {
    output: FlexTensor,
    mean: FlexTensor,
    variance: FlexTensor,
}

fn forward(runs: Runs, x: &FlexTensor) -> Normalised {
    let x = contiguous(x);
    let mut out = output(x.shape());
    let statistics = Shape::new([runs.count as usize]);
    let (mut mean, mut variance) = (output(statistics.clone()), output(statistics));
    let (dst, mean_values, variance_values) =
        (out.storage_mut::<f32>(), mean.storage_mut::<f32>(), variance.storage_mut::<f32>());
    let elements = (runs.count * runs.length) as usize;
    assert_len("GroupNorm input", values(&x), elements);
    assert_len("GroupNorm output", dst, elements);
    assert_len("GroupNorm mean", mean_values, runs.count as usize);
    assert_len("GroupNorm variance", variance_values, runs.count as usize);
    // SAFETY: each pointer is to a contiguous f32 buffer of the length `runs` implies
    // (asserted above), alive for the call; the three outputs are distinct tensors and the
    // only ones written; the shim keeps no pointer after it returns.
    checked("GroupNorm forward", |error, len| unsafe {
        ei_normalise_forward(
            runs.count,
            runs.length,
            runs.epsilon,
            threads(),
            values(&x).as_ptr(),
            dst.as_mut_ptr(),
            mean_values.as_mut_ptr(),
            variance_values.as_mut_ptr(),
            error,
            len,
        )
    });
    Normalised { output: out, mean, variance }
}

fn input_gradient(
    runs: Runs,
    x: &FlexTensor,
    mean: &FlexTensor,
    variance: &FlexTensor,
    grad: &FlexTensor,
) -> FlexTensor {
    let (x, grad) = (contiguous(x), contiguous(grad));
    let mut out = output(x.shape());
    let diff_src = out.storage_mut::<f32>();
    let elements = (runs.count * runs.length) as usize;
    assert_len("GroupNorm input", values(&x), elements);
    assert_len("GroupNorm mean", values(mean), runs.count as usize);
    assert_len("GroupNorm variance", values(variance), runs.count as usize);
    assert_len("GroupNorm output gradient", values(&grad), elements);
    assert_len("GroupNorm input gradient", diff_src, elements);
    // SAFETY: as in `forward`: lengths asserted above, buffers alive for the call,
    // `diff_src` the only one written.
    checked("GroupNorm backward", |error, len| unsafe {
        ei_normalise_backward(
            runs.count,
            runs.length,
            runs.epsilon,
            threads(),
            values(&x).as_ptr(),
            values(mean).as_ptr(),
            values(variance).as_ptr(),
            values(&grad).as_ptr(),
            diff_src.as_mut_ptr(),
            error,
            len,
        )
    });
    out
}

#[derive(Debug)]
struct NormaliseBackward;

impl Backward<Flex, 1> for NormaliseBackward {
    /// The checkpointed input, the forward pass's statistics and the runs.
    type State = (NodeId, FlexTensor, FlexTensor, Runs);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x_state, mean, variance, runs) = ops.state;
        let x: FlexTensor = checkpointer.retrieve_node_output(x_state);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, input_gradient(runs, &x, &mean, &variance, &grad));
        }
    }
}

/// `x [N, C, H, W]` normalised over each of `groups` channel groups per sample, by oneDNN;
/// `None` if `x` is not an f32 tensor on Flex.
pub fn group_normalize(x: &Tensor<4>, groups: usize, epsilon: f32) -> Option<Tensor<4>> {
    let [n, c, h, w] = x.dims();
    if groups == 0 || c % groups != 0 {
        return None;
    }
    let runs = Runs { count: (n * groups) as i64, length: (c / groups * h * w) as i64, epsilon };
    Some(
        match on_flex(x)? {
            FlexFloat::Tracked(x) => FlexFloat::Tracked(
                match NormaliseBackward.prepare::<NoCheckpointing>([x.node()]).compute_bound().stateful() {
                    OpsKind::Tracked(mut prep) => {
                        let Normalised { output, mean, variance } = forward(runs, x.primitive());
                        let state = (prep.checkpoint(&x), mean, variance, runs);
                        prep.finish(state, output)
                    }
                    OpsKind::UnTracked(prep) => prep.finish(forward(runs, x.primitive()).output),
                },
            ),
            FlexFloat::Plain(x) => FlexFloat::Plain(forward(runs, &x).output),
        }
        .into_tensor(),
    )
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    use crate::model::unet::normalize_groups;

    #[test]
    fn matches_the_primitive_form_forward_and_backward() {
        let device = Device::flex().autodiff();
        for (shape, groups) in [([2, 8, 5, 5], 4), ([3, 16, 6, 4], 8), ([1, 8, 1, 1], 8)] {
            let x = Tensor::<4>::random(shape, Distribution::Uniform(-3.0, 5.0), &device).require_grad();
            let up = Tensor::<4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
            let ours = super::group_normalize(&x, groups, 1e-5).expect("Flex autodiff is covered");
            let burns = normalize_groups(x.clone(), groups, 1e-5);
            let forward: f32 = ours.clone().sub(burns.clone()).abs().max().into_scalar();
            assert!(forward < 1e-4, "{shape:?}/{groups}: forward differs by {forward}");
            let (ours, burns) = (ours.mul(up.clone()).sum().backward(), burns.mul(up).sum().backward());
            let gradient: f32 = x.grad(&ours).unwrap().sub(x.grad(&burns).unwrap()).abs().max().into_scalar();
            assert!(gradient < 1e-3, "{shape:?}/{groups}: input gradient differs by {gradient}");
        }
    }

    #[test]
    fn declines_groups_that_do_not_divide_the_channels() {
        let x = Tensor::<4>::zeros([1, 6, 2, 2], &Device::flex());
        assert!(super::group_normalize(&x, 4, 1e-5).is_none());
    }
}

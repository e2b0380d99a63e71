//! The UNet's heavy operations on burn's Flex (CPU) backend, run by oneDNN: convolution,
//! SiLU and GroupNorm's normalisation, forward and backward.
//!
//! burn-flex convolves through a generic im2col + GEMM per call, and composes SiLU and
//! GroupNorm from elementwise primitives that its autodiff differentiates one by one; on a
//! training step that was 6× PyTorch (`docs/performance.md`). oneDNN — the library PyTorch
//! itself uses on the CPU — has JIT kernels for all three. This module owns that path: the
//! FFI to the C++ shim `native/onednn.cpp` (built by `build.rs`, linked against Debian's
//! libdnnl), and burn autodiff operations whose backward passes call oneDNN's gradient
//! primitives.
//!
//! Each entry point returns `None` when its tensors are not f32 on Flex (with or without
//! autodiff) or the operation is outside what the shim covers; `BurnOps` then runs burn's own
//! operation, which is what happens on wgpu. Once oneDNN is chosen there is no fallback: a
//! oneDNN error is a bug and panics with oneDNN's message.

mod conv;
mod group_norm;
mod silu;

use std::ffi::{CStr, c_char, c_int};

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Shape, Tensor};

pub use conv::conv2d;
pub use group_norm::group_normalize;
pub use silu::silu;

/// A float tensor's Flex primitive: tracked by autodiff, or plain.
enum FlexFloat {
    Tracked(FloatTensor<Autodiff<Flex>>),
    Plain(FlexTensor),
}

impl FlexFloat {
    fn into_tensor<const D: usize>(self) -> Tensor<D> {
        match self {
            Self::Tracked(t) => Tensor::from_primitive::<Autodiff<Flex>>(t),
            Self::Plain(t) => Tensor::from_primitive::<Flex>(t),
        }
    }
}

/// `tensor`'s Flex primitive, or `None` if it is not an f32 tensor on Flex.
fn on_flex<const D: usize>(tensor: &Tensor<D>) -> Option<FlexFloat> {
    if tensor.dtype() != DType::F32 {
        return None;
    }
    if let Ok(tracked) = tensor.clone().try_into_primitive::<Autodiff<Flex>>() {
        return Some(FlexFloat::Tracked(tracked));
    }
    tensor.clone().try_into_primitive::<Flex>().ok().map(FlexFloat::Plain)
}

/// Runs one shim call, panicking with oneDNN's message if it fails.
fn checked(what: &str, call: impl FnOnce(*mut c_char, usize) -> c_int) {
    let mut error = [0 as c_char; 512];
    if call(error.as_mut_ptr(), error.len()) != 0 {
        let message = unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy();
        panic!("oneDNN {what} failed: {message}");
    }
}

/// oneDNN uses as many threads as burn's rayon pool, so `RAYON_NUM_THREADS` bounds both.
fn threads() -> c_int {
    rayon::current_num_threads() as c_int
}

/// `tensor` with a contiguous f32 buffer, copying only if it is strided.
fn contiguous(tensor: &FlexTensor) -> FlexTensor {
    if tensor.as_slice::<f32>().is_some() { tensor.clone() } else { tensor.to_contiguous() }
}

fn values(tensor: &FlexTensor) -> &[f32] {
    tensor.as_slice::<f32>().expect("a contiguous f32 tensor")
}

fn output(shape: Shape) -> FlexTensor {
    FlexTensor::empty(shape, DType::F32)
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    use crate::model::architecture::UNetConfig;
    use crate::model::unet::UNet;

    /// A UNet's output and input gradient: every oneDNN operation, forward and backward.
    fn pass(model: &UNet, x: &Tensor<4>, t: &Tensor<1>) -> (Vec<f32>, Vec<f32>) {
        let out = model.forward(x.clone(), t.clone());
        let grad = x.grad(&out.clone().sum().backward()).expect("x requires grad");
        (out.into_data().try_to_vec().unwrap(), grad.into_data().try_to_vec().unwrap())
    }

    /// The drill for oneDNN's library-managed scratchpad, which belongs to the (cached,
    /// shared) primitive: threads training one architecture at once (the retrain tests, in
    /// parallel) got NaN losses from it, and this test never finished. Each thread must get
    /// exactly what it gets alone.
    #[test]
    fn threads_running_the_unet_at_once_get_their_own_results() {
        let device = Device::flex().autodiff();
        let config = UNetConfig { base_channels: 8, channel_mults: vec![1, 2], groups: 4, ..UNetConfig::default() };
        let cases: Vec<_> = (0..4usize)
            .map(|i| {
                let model = UNet::init(&config, i as u64, &device).unwrap();
                let x = Tensor::<4>::random([4, 1, 24, 24], Distribution::Uniform(-1.0, 1.0), &device).require_grad();
                let t = Tensor::<1>::from_floats([10.0, 200.0, 500.0, 900.0], &device);
                let alone = pass(&model, &x, &t);
                (model, x, t, alone)
            })
            .collect();
        std::thread::scope(|scope| {
            for (i, (model, x, t, alone)) in cases.iter().enumerate() {
                scope.spawn(move || {
                    for round in 0..10 {
                        assert!(
                            pass(model, x, t) == *alone,
                            "thread {i}, round {round}: results differ from a lone run"
                        );
                    }
                });
            }
        });
    }
}

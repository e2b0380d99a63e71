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

/// Runs one shim call, panicking with oneDNN's message if it fails. The call gets a
/// 512-byte message buffer and its length; the shim writes at most `len − 1` bytes and a
/// NUL into it, whatever it catches (`guarded` in `native/onednn.cpp`).
fn checked(what: &str, call: impl FnOnce(*mut c_char, usize) -> c_int) {
    let mut error = [0 as c_char; 512];
    if call(error.as_mut_ptr(), error.len()) != 0 {
        // SAFETY: `error` is NUL-terminated: zero-filled, and the shim's `guarded` writes a
        // NUL at `len − 1` at the latest.
        let message = unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy();
        panic!("oneDNN {what} failed: {message}");
    }
}

/// Asserts that `buffer` holds the `expected` f32 values the shape handed to the shim
/// implies: C++ reads and writes exactly that many through the raw pointer, so a mismatch
/// must stop here, not become an out-of-bounds access there.
fn assert_len(what: &str, buffer: &[f32], expected: usize) {
    assert_eq!(
        buffer.len(),
        expected,
        "oneDNN {what}: a buffer of {} values, the shape needs {expected}",
        buffer.len()
    );
}

/// How many primitives the shim holds in its caches now (at most
/// [`PRIMITIVE_CACHE_CAPACITY`] per kind of operation).
#[cfg(test)]
fn cached_primitives() -> usize {
    unsafe extern "C" {
        fn ei_cached_primitives() -> i64;
    }
    // SAFETY: takes no arguments and only reads the caches' sizes under their locks.
    unsafe { ei_cached_primitives() as usize }
}

/// The shim keeps at most this many primitives per kind of operation, dropping the least
/// recently used (`kCacheCapacity` in `native/onednn.cpp`; a training run has a handful of
/// shapes, a process that sees many shapes must not grow without bound).
#[cfg(test)]
const PRIMITIVE_CACHE_CAPACITY: usize = 64;

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

    use super::{PRIMITIVE_CACHE_CAPACITY, cached_primitives};

    use crate::model::architecture::UNetConfig;
    use crate::model::unet::UNet;

    /// A UNet's output and input gradient: every oneDNN operation, forward and backward.
    fn pass(model: &UNet, x: &Tensor<4>, t: &Tensor<1>) -> (Vec<f32>, Vec<f32>) {
        let out = model.forward(x.clone(), t.clone());
        let grad = x.grad(&out.clone().sum().backward()).expect("x requires grad");
        (out.into_data().try_to_vec().unwrap(), grad.into_data().try_to_vec().unwrap())
    }

    /// Each new tensor size is a new SiLU primitive: 4× the cache's capacity of them leave
    /// at most the capacity per kind behind (the cache was once unbounded), and a size run
    /// again after eviction is rebuilt and still right.
    #[test]
    fn the_primitive_cache_is_bounded() {
        let device = Device::flex();
        let silu = |n: usize| {
            let x = Tensor::<1>::from_floats(vec![1.0f32; n].as_slice(), &device);
            let y: Vec<f32> = super::silu(&x).expect("f32 on Flex").into_data().try_to_vec().unwrap();
            assert!(y.len() == n && y.iter().all(|v| (v - 0.731_058_6).abs() < 1e-5), "SiLU of {n} ones");
        };
        for n in 0..4 * PRIMITIVE_CACHE_CAPACITY {
            silu(1000 + n);
        }
        // Three kinds of operation (convolution, SiLU, normalisation) share no cache.
        let held = cached_primitives();
        assert!(held <= 3 * PRIMITIVE_CACHE_CAPACITY, "{held} primitives cached");
        silu(1000);
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

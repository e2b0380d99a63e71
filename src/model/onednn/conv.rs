//! Convolution: forward, and a backward pass through oneDNN's input- and weight-gradient
//! primitives. Covers square, undilated, ungrouped kernels with a bias and symmetric
//! padding — every convolution of the UNet.

use std::ffi::{c_char, c_int};

use burn::backend::Flex;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::{Shape, Tensor};

use super::{FlexFloat, assert_len, checked, contiguous, on_flex, output, threads, values};

/// The shape of one convolution, as the shim takes it (`ei_conv_geometry`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct Geometry {
    batch: i64,
    in_channels: i64,
    height: i64,
    width: i64,
    out_channels: i64,
    kernel: i64,
    stride: i64,
    padding: i64,
}

impl Geometry {
    /// The geometry of `layer` applied to an input of `input` shape, or `None` if the shim
    /// does not cover the layer.
    fn of(layer: &Conv2d, input: [usize; 4]) -> Option<Self> {
        let [out_channels, in_channels, kernel_h, kernel_w] = layer.weight.dims();
        let [batch, channels, height, width] = input;
        let padding = match layer.padding {
            PaddingConfig2d::Explicit(top, left, bottom, right) if top == left && left == bottom && bottom == right => {
                top
            }
            _ => return None,
        };
        let covered = kernel_h == kernel_w
            && layer.stride[0] == layer.stride[1]
            && layer.dilation == [1, 1]
            && layer.groups == 1
            && channels == in_channels;
        covered.then(|| Self {
            batch: batch as i64,
            in_channels: in_channels as i64,
            height: height as i64,
            width: width as i64,
            out_channels: out_channels as i64,
            kernel: kernel_h as i64,
            stride: layer.stride[0] as i64,
            padding: padding as i64,
        })
    }

    fn output_shape(&self) -> Shape {
        let out = |size: i64| ((size + 2 * self.padding - self.kernel) / self.stride + 1) as usize;
        Shape::new([self.batch as usize, self.out_channels as usize, out(self.height), out(self.width)])
    }

    fn input_shape(&self) -> Shape {
        Shape::new([self.batch as usize, self.in_channels as usize, self.height as usize, self.width as usize])
    }

    fn weight_shape(&self) -> Shape {
        let k = self.kernel as usize;
        Shape::new([self.out_channels as usize, self.in_channels as usize, k, k])
    }
}

// The shim's functions (`native/onednn.cpp`), declared with the C types it defines them with;
// a change there must change these.
unsafe extern "C" {
    fn ei_conv_forward(
        geometry: *const Geometry,
        threads: c_int,
        src: *const f32,
        weights: *const f32,
        bias: *const f32,
        dst: *mut f32,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn ei_conv_backward_data(
        geometry: *const Geometry,
        threads: c_int,
        diff_dst: *const f32,
        weights: *const f32,
        diff_src: *mut f32,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn ei_conv_backward_weights(
        geometry: *const Geometry,
        threads: c_int,
        src: *const f32,
        diff_dst: *const f32,
        diff_weights: *mut f32,
        diff_bias: *mut f32,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

fn forward(geometry: &Geometry, x: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor) -> FlexTensor {
    let (x, weight, bias) = (contiguous(x), contiguous(weight), contiguous(bias));
    let mut out = output(geometry.output_shape());
    let dst = out.storage_mut::<f32>();
    assert_len("convolution input", values(&x), geometry.input_shape().num_elements());
    assert_len("convolution weights", values(&weight), geometry.weight_shape().num_elements());
    assert_len("convolution bias", values(&bias), geometry.out_channels as usize);
    assert_len("convolution output", dst, geometry.output_shape().num_elements());
    // SAFETY: `geometry` is a live `#[repr(C)]` struct laid out as `ei_conv_geometry`; each
    // pointer is to a contiguous f32 buffer whose length the geometry implies (asserted
    // above), alive and unaliased for the call (`dst` is the only mutable one); the shim
    // keeps no pointer after it returns.
    checked("convolution forward", |error, len| unsafe {
        ei_conv_forward(
            geometry,
            threads(),
            values(&x).as_ptr(),
            values(&weight).as_ptr(),
            values(&bias).as_ptr(),
            dst.as_mut_ptr(),
            error,
            len,
        )
    });
    out
}

fn input_gradient(geometry: &Geometry, grad: &FlexTensor, weight: &FlexTensor) -> FlexTensor {
    let (grad, weight) = (contiguous(grad), contiguous(weight));
    let mut out = output(geometry.input_shape());
    let diff_src = out.storage_mut::<f32>();
    assert_len("convolution output gradient", values(&grad), geometry.output_shape().num_elements());
    assert_len("convolution weights", values(&weight), geometry.weight_shape().num_elements());
    assert_len("convolution input gradient", diff_src, geometry.input_shape().num_elements());
    // SAFETY: as in `forward`: lengths asserted above, buffers alive for the call,
    // `diff_src` the only one written.
    checked("convolution input gradient", |error, len| unsafe {
        ei_conv_backward_data(
            geometry,
            threads(),
            values(&grad).as_ptr(),
            values(&weight).as_ptr(),
            diff_src.as_mut_ptr(),
            error,
            len,
        )
    });
    out
}

fn weight_and_bias_gradients(geometry: &Geometry, x: &FlexTensor, grad: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let (x, grad) = (contiguous(x), contiguous(grad));
    let mut weights = output(geometry.weight_shape());
    let mut bias = output(Shape::new([geometry.out_channels as usize]));
    let (diff_weights, diff_bias) = (weights.storage_mut::<f32>(), bias.storage_mut::<f32>());
    assert_len("convolution input", values(&x), geometry.input_shape().num_elements());
    assert_len("convolution output gradient", values(&grad), geometry.output_shape().num_elements());
    assert_len("convolution weight gradient", diff_weights, geometry.weight_shape().num_elements());
    assert_len("convolution bias gradient", diff_bias, geometry.out_channels as usize);
    // SAFETY: as in `forward`: lengths asserted above, buffers alive for the call, the two
    // gradients (distinct tensors) the only ones written.
    checked("convolution weight gradient", |error, len| unsafe {
        ei_conv_backward_weights(
            geometry,
            threads(),
            values(&x).as_ptr(),
            values(&grad).as_ptr(),
            diff_weights.as_mut_ptr(),
            diff_bias.as_mut_ptr(),
            error,
            len,
        )
    });
    (weights, bias)
}

/// The backward pass of a convolution with bias: parents are input, weight and bias.
#[derive(Debug)]
struct ConvBackward;

impl Backward<Flex, 3> for ConvBackward {
    /// The checkpointed input and weight, and the geometry.
    type State = (NodeId, NodeId, Geometry);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x_state, weight_state, geometry) = ops.state;
        let x: FlexTensor = checkpointer.retrieve_node_output(x_state);
        let weight: FlexTensor = checkpointer.retrieve_node_output(weight_state);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, input_gradient(&geometry, &grad, &weight));
        }
        if node_weight.is_some() || node_bias.is_some() {
            let (weight_grad, bias_grad) = weight_and_bias_gradients(&geometry, &x, &grad);
            if let Some(node) = node_weight {
                grads.register::<Flex>(node.id, weight_grad);
            }
            if let Some(node) = node_bias {
                grads.register::<Flex>(node.id, bias_grad);
            }
        }
    }
}

/// `layer` applied to `x` by oneDNN, or `None` where this path does not cover them.
pub fn conv2d(layer: &Conv2d, x: &Tensor<4>) -> Option<Tensor<4>> {
    let geometry = Geometry::of(layer, x.dims())?;
    let bias = layer.bias.as_ref()?.val();
    let tensors = (on_flex(x)?, on_flex(&layer.weight.val())?, on_flex(&bias)?);
    match tensors {
        (FlexFloat::Tracked(x), FlexFloat::Tracked(weight), FlexFloat::Tracked(bias)) => {
            let out = match ConvBackward
                .prepare::<NoCheckpointing>([x.node(), weight.node(), bias.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let state = (prep.checkpoint(&x), prep.checkpoint(&weight), geometry);
                    prep.finish(state, forward(&geometry, x.primitive(), weight.primitive(), bias.primitive()))
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(forward(&geometry, x.primitive(), weight.primitive(), bias.primitive()))
                }
            };
            Some(FlexFloat::Tracked(out).into_tensor())
        }
        (FlexFloat::Plain(x), FlexFloat::Plain(weight), FlexFloat::Plain(bias)) => {
            Some(FlexFloat::Plain(forward(&geometry, &x, &weight, &bias)).into_tensor())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::tensor::{Device, Distribution, TensorData};

    fn layer(c_in: usize, c_out: usize, kernel: usize, stride: usize, device: &Device) -> Conv2d {
        let pad = kernel / 2;
        Conv2d {
            weight: Param::from_tensor(Tensor::random(
                [c_out, c_in, kernel, kernel],
                Distribution::Uniform(-0.5, 0.5),
                device,
            )),
            bias: Some(Param::from_tensor(Tensor::random([c_out], Distribution::Uniform(-0.5, 0.5), device))),
            stride: [stride, stride],
            kernel_size: [kernel, kernel],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Explicit(pad, pad, pad, pad),
        }
    }

    fn max_abs_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        a.sub(b).abs().max().into_scalar()
    }

    fn assert_close(what: &str, ours: TensorData, burns: TensorData) {
        let (ours, burns) = (ours.try_to_vec::<f32>().unwrap(), burns.try_to_vec::<f32>().unwrap());
        let scale = burns.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let worst = ours.iter().zip(&burns).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-4 * scale, "{what}: max |oneDNN − burn| = {worst} (largest value {scale})");
    }

    /// Forward values and every gradient (input, weight, bias) match burn-flex's own
    /// convolution, for the kernel sizes, strides and shapes the UNet uses.
    #[test]
    fn matches_burns_convolution_forward_and_backward() {
        let device = Device::flex().autodiff();
        for (c_in, c_out, kernel, stride, size) in
            [(1, 8, 3, 1, 9), (8, 16, 3, 2, 12), (16, 8, 1, 1, 7), (12, 4, 3, 1, 5)]
        {
            let layer = layer(c_in, c_out, kernel, stride, &device);
            let x =
                Tensor::<4>::random([3, c_in, size, size], Distribution::Uniform(-1.0, 1.0), &device).require_grad();
            let up = Tensor::<4>::random(layer.forward(x.clone()).dims(), Distribution::Uniform(-1.0, 1.0), &device);
            let ours = conv2d(&layer, &x).expect("the oneDNN path covers this layer");
            let burns = layer.forward(x.clone());
            assert!(max_abs_diff(ours.clone(), burns.clone()) < 1e-4, "forward {c_in}->{c_out} k{kernel} s{stride}");
            let ours_grads = ours.mul(up.clone()).sum().backward();
            let burns_grads = burns.mul(up).sum().backward();
            let shape = format!("{c_in}->{c_out} k{kernel} s{stride}");
            assert_close(
                &format!("input gradient {shape}"),
                x.grad(&ours_grads).unwrap().into_data(),
                x.grad(&burns_grads).unwrap().into_data(),
            );
            assert_close(
                &format!("weight gradient {shape}"),
                layer.weight.val().grad(&ours_grads).unwrap().into_data(),
                layer.weight.val().grad(&burns_grads).unwrap().into_data(),
            );
            let bias = layer.bias.as_ref().unwrap().val();
            assert_close(
                &format!("bias gradient {shape}"),
                bias.grad(&ours_grads).unwrap().into_data(),
                bias.grad(&burns_grads).unwrap().into_data(),
            );
        }
    }

    #[test]
    fn runs_without_autodiff_and_declines_what_it_does_not_cover() {
        let device = Device::flex();
        let plain = layer(4, 6, 3, 1, &device);
        let x = Tensor::<4>::random([2, 4, 8, 8], Distribution::Uniform(-1.0, 1.0), &device);
        let ours = conv2d(&plain, &x).expect("plain Flex is covered");
        assert!(max_abs_diff(ours, plain.forward(x.clone())) < 1e-4);

        let mut dilated = layer(4, 6, 3, 1, &device);
        dilated.dilation = [2, 2];
        assert!(conv2d(&dilated, &x).is_none(), "dilation is left to burn");
        let mut unbiased = layer(4, 6, 3, 1, &device);
        unbiased.bias = None;
        assert!(conv2d(&unbiased, &x).is_none(), "a bias-free layer is left to burn");
    }
}

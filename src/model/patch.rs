//! The normal-patch model of the `patch` map rule: a Gaussian of the pretrained patch
//! features of normal tiles, its robust fit, and the graph that scores a tile with it.
//!
//! The fit is robust the way RDDPM makes the UNet robust: field frames are contaminated,
//! so after a first fit the patch vectors farthest from it (the highest-loss entries, in
//! Mahalanobis distance) are left out and the Gaussian is fitted again, a few times
//! (the concentration steps of MCD, Rousseeuw & Van Driessen 1999). A defect patch is far
//! from the texture's Gaussian, so it is what the trim removes first; a rare normal pattern
//! is kept as long as its vectors are within the bulk's spread.
//!
//! A tile's map is the Mahalanobis distance of each feature cell, `‖W(f − μ)‖` with `W`
//! the inverse of the covariance's Cholesky factor: one 1×1 convolution, a square and a
//! channel sum in ONNX, upsampled (bilinear) to the tile.
//!
//! For parts that sit in the same place in every frame (a fixture, frames seen whole) the
//! model can instead be one Gaussian per feature cell ([`PerPosition`], PaDiM: Defard et al.
//! 2021): what is normal at one place may be a defect at another. Its graph is a batched
//! matrix product of every cell's features with that cell's own `W`.

use nalgebra::{DMatrix, DVector};

use super::backbone::Backbone;
use super::manifest::FeatureSpec;
use super::onnx_export::{
    Dim, INPUT_IMAGE, INPUT_TIME, OUTPUT_EPS, OnnxEmitter, attr_int, attr_ints, attr_string, graph_proto, value_info,
};

/// A Gaussian of patch vectors, kept as `μ` and the whitening `W = L⁻¹` (`Σ = L·Lᵀ`).
#[derive(Debug, Clone)]
pub struct Gaussian {
    mean: DVector<f64>,
    whitening: DMatrix<f64>,
}

/// How the Gaussian is fitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RobustFit {
    /// Fraction of vectors left out (the most distant) before each refit.
    pub trim: f64,
    /// Refits after the first fit.
    pub rounds: usize,
    /// Ridge added to the covariance, as a fraction of its mean variance.
    pub shrinkage: f64,
}

impl RobustFit {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..0.5).contains(&self.trim) {
            return Err(format!("the patch model's trim must be in [0, 0.5), got {}", self.trim));
        }
        if !(self.shrinkage > 0.0 && self.shrinkage < 1.0) {
            return Err(format!("the patch model's shrinkage must be in (0, 1), got {}", self.shrinkage));
        }
        if self.rounds > 20 {
            return Err(format!("the patch model's refits must be at most 20, got {}", self.rounds));
        }
        Ok(())
    }
}

impl Gaussian {
    /// Fits `vectors` (`n × dim`, row-major) robustly; see the module docs.
    pub fn fit(vectors: &[f32], dim: usize, fit: &RobustFit) -> Result<Self, String> {
        let n = vectors.len() / dim;
        if n <= dim {
            return Err(format!("{n} patch vectors cannot fit a Gaussian of {dim} dimensions"));
        }
        let mut keep: Vec<usize> = (0..n).collect();
        let mut model = Self::fit_subset(vectors, dim, &keep, fit.shrinkage)?;
        let kept = n - (fit.trim * n as f64).round() as usize;
        for _ in 0..fit.rounds {
            let mut distance: Vec<(f64, usize)> =
                (0..n).map(|i| (model.distance_squared(&vectors[i * dim..(i + 1) * dim]), i)).collect();
            distance.select_nth_unstable_by(kept - 1, |a, b| a.0.total_cmp(&b.0));
            keep = distance[..kept].iter().map(|&(_, i)| i).collect();
            model = Self::fit_subset(vectors, dim, &keep, fit.shrinkage)?;
        }
        Ok(model)
    }

    fn fit_subset(vectors: &[f32], dim: usize, rows: &[usize], shrinkage: f64) -> Result<Self, String> {
        let n = rows.len() as f64;
        let mut mean = DVector::<f64>::zeros(dim);
        for &r in rows {
            mean += DVector::from_iterator(dim, vectors[r * dim..(r + 1) * dim].iter().map(|&v| v as f64));
        }
        mean /= n;
        let mut centred = DMatrix::<f64>::zeros(dim, rows.len());
        for (j, &r) in rows.iter().enumerate() {
            for d in 0..dim {
                centred[(d, j)] = vectors[r * dim + d] as f64 - mean[d];
            }
        }
        let mut covariance = (&centred * centred.transpose()) / (n - 1.0);
        let ridge = shrinkage * covariance.trace() / dim as f64;
        for d in 0..dim {
            covariance[(d, d)] += ridge.max(f64::MIN_POSITIVE);
        }
        let cholesky = covariance.cholesky().ok_or("the patch covariance is not positive definite")?;
        let whitening = cholesky.l().try_inverse().ok_or("the patch covariance's Cholesky factor is singular")?;
        Ok(Self { mean, whitening })
    }

    /// `(f − μ)ᵀ Σ⁻¹ (f − μ)`.
    pub fn distance_squared(&self, f: &[f32]) -> f64 {
        let centred = DVector::from_iterator(f.len(), f.iter().zip(self.mean.iter()).map(|(&v, m)| v as f64 - m));
        (&self.whitening * centred).norm_squared()
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }
}

/// One Gaussian per feature cell of a fixed-size frame (PaDiM), each fitted robustly on
/// that cell's vectors across the training frames.
#[derive(Debug, Clone)]
pub struct PerPosition {
    /// Feature cells `[h, w]`.
    pub cells: [usize; 2],
    gaussians: Vec<Gaussian>,
}

impl PerPosition {
    /// Fits cell `p`'s Gaussian on row `frame · cells + p` of `vectors` (`n · cells × dim`,
    /// row-major: every frame's cells in order), for each cell.
    pub fn fit(vectors: &[f32], dim: usize, cells: [usize; 2], fit: &RobustFit) -> Result<Self, String> {
        let count = cells[0] * cells[1];
        let frames = vectors.len() / (dim * count);
        let gaussians = (0..count)
            .map(|p| {
                let rows: Vec<f32> = (0..frames)
                    .flat_map(|f| vectors[(f * count + p) * dim..(f * count + p + 1) * dim].iter().copied())
                    .collect();
                Gaussian::fit(&rows, dim, fit).map_err(|e| format!("feature cell {p}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { cells, gaussians })
    }

    /// Cell `p`'s Gaussian.
    pub fn at(&self, p: usize) -> &Gaussian {
        &self.gaussians[p]
    }
}

/// The `patch` rule's graph in the head's contract: `x_t [N, 2C, T, T]` (frame ‖
/// reconstruction; only the frame is read) and `t [N]` (unused) → `eps [N, 2C, T, T]`,
/// every channel the Mahalanobis distance map of the frame's patch features.
pub fn patch_onnx(
    backbone: &Backbone,
    spec: &FeatureSpec,
    gaussian: &Gaussian,
    channels: usize,
    producer_version: &str,
) -> Vec<u8> {
    let mut e = OnnxEmitter::default();
    let features = frame_features(&mut e, backbone, spec, channels);
    let dim = gaussian.dim();
    let w: Vec<f32> = gaussian.whitening.transpose().iter().map(|&v| v as f32).collect();
    let bias: Vec<f32> = (-(&gaussian.whitening * &gaussian.mean)).iter().map(|&v| v as f32).collect();
    // `whitening` is column-major in nalgebra: its transpose's storage is W row by row.
    let w = e.float_initializer("patch.whitening", &[dim, dim, 1, 1], w);
    let b = e.float_initializer("patch.bias", &[dim], bias);
    let attrs = vec![attr_ints("kernel_shape", &[1, 1])];
    let z = e.node("Conv", &[&features, &w, &b], attrs);
    let squared = e.node("Mul", &[&z, &z], vec![]);
    let axis = e.int_constant(&[1]);
    let sum = e.node("ReduceSum", &[&squared, &axis], vec![attr_int("keepdims", 1)]);
    let distance = e.node("Sqrt", &[&sum], vec![]);
    map_graph(e, &distance, "patch_gaussian", channels, producer_version)
}

/// The per-position model's graph, in the same contract as [`patch_onnx`], for frames of
/// exactly the size it was fitted on: the features `[N, D, h, w]` become `[h·w, N, D]`,
/// each cell's rows are centred and whitened by its own `μ` and `W` in one batched MatMul,
/// and the distances go back to `[N, 1, h, w]`.
pub fn per_position_onnx(
    backbone: &Backbone,
    spec: &FeatureSpec,
    model: &PerPosition,
    channels: usize,
    producer_version: &str,
) -> Vec<u8> {
    let mut e = OnnxEmitter::default();
    let features = frame_features(&mut e, backbone, spec, channels);
    let dim = model.gaussians[0].dim();
    let [h, w] = model.cells;
    let count = h * w;
    let mut means = Vec::with_capacity(count * dim);
    let mut whitening_t = Vec::with_capacity(count * dim * dim);
    for g in &model.gaussians {
        means.extend(g.mean.iter().map(|&v| v as f32));
        // Row-major Wᵀ: `z = (f − μ) Wᵀ` for row vectors; nalgebra stores W by columns.
        whitening_t.extend(g.whitening.iter().map(|&v| v as f32));
    }
    let flat = e.int_constant(&[0, dim as i64, count as i64]);
    let rows = e.node("Reshape", &[&features, &flat], vec![]);
    let by_cell = e.node("Transpose", &[&rows], vec![attr_ints("perm", &[2, 0, 1])]);
    let mean = e.float_initializer("padim.mean", &[count, 1, dim], means);
    let centred = e.node("Sub", &[&by_cell, &mean], vec![]);
    let wt = e.float_initializer("padim.whitening_t", &[count, dim, dim], whitening_t);
    let z = e.node("MatMul", &[&centred, &wt], vec![]);
    let squared = e.node("Mul", &[&z, &z], vec![]);
    let axis = e.int_constant(&[2]);
    let sum = e.node("ReduceSum", &[&squared, &axis], vec![attr_int("keepdims", 0)]);
    let distance = e.node("Sqrt", &[&sum], vec![]);
    let by_frame = e.node("Transpose", &[&distance], vec![attr_ints("perm", &[1, 0])]);
    let grid = e.int_constant(&[-1, 1, h as i64, w as i64]);
    let map = e.node("Reshape", &[&by_frame, &grid], vec![]);
    map_graph(e, &map, "patch_per_position", channels, producer_version)
}

/// The frame half of the pair input, through the backbone to its patch features.
fn frame_features(e: &mut OnnxEmitter, backbone: &Backbone, spec: &FeatureSpec, channels: usize) -> String {
    let (start, end, axis) = (e.int_constant(&[0]), e.int_constant(&[channels as i64]), e.int_constant(&[1]));
    let frame = e.node("Slice", &[INPUT_IMAGE, &start, &end, &axis], vec![]);
    backbone.emit_patch_features(e, &frame, channels, spec)
}

/// Finishes a patch graph: the distance map `[N, 1, h, w]` upsampled (bilinear) to the
/// tile and broadcast to every output channel.
fn map_graph(mut e: OnnxEmitter, distance: &str, name: &str, channels: usize, producer_version: &str) -> Vec<u8> {
    let size = e.map_size(INPUT_IMAGE);
    let attrs = vec![attr_string("mode", "linear"), attr_string("coordinate_transformation_mode", "half_pixel")];
    let map = e.node("Resize", &[distance, "", "", &size], attrs);
    let shape = e.node("Shape", &[INPUT_IMAGE], vec![]);
    e.push_node("Expand", &[&map, &shape], vec![], Some(OUTPUT_EPS.to_string()));
    let pair = [Dim::Param("N"), Dim::Value(2 * channels as i64), Dim::Param("H"), Dim::Param("W")];
    let inputs = vec![value_info(INPUT_IMAGE, &pair), value_info(INPUT_TIME, &[Dim::Param("N")])];
    graph_proto(e, name, inputs, vec![value_info(OUTPUT_EPS, &pair)], producer_version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// 2-D vectors: a unit Gaussian cloud and 10 % outliers far along one axis.
    fn contaminated(seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        for i in 0..2000 {
            let (a, b): (f32, f32) = (rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0));
            let shift = if i % 10 == 0 { 12.0 } else { 0.0 };
            out.extend([a * 1.7 + shift, b * 1.7]);
        }
        out
    }

    #[test]
    fn trimming_keeps_outliers_out_of_the_fit() {
        let vectors = contaminated(1);
        let plain = Gaussian::fit(&vectors, 2, &RobustFit { trim: 0.0, rounds: 0, shrinkage: 1e-3 }).unwrap();
        let robust = Gaussian::fit(&vectors, 2, &RobustFit { trim: 0.15, rounds: 3, shrinkage: 1e-3 }).unwrap();
        assert!(plain.mean[0] > 1.0, "the outliers pull the plain mean: {}", plain.mean[0]);
        assert!(robust.mean[0].abs() < 0.1, "the robust mean stays with the bulk: {}", robust.mean[0]);
        // An outlier is farther from the robust fit than from the plain one, in its units.
        let outlier = [12.0f32, 0.0];
        assert!(robust.distance_squared(&outlier) > 4.0 * plain.distance_squared(&outlier));
    }

    #[test]
    fn distance_is_the_mahalanobis_distance() {
        // Axis-aligned: variances 4 and 1 (within sampling error), mean 0.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let vectors: Vec<f32> = (0..40_000)
            .flat_map(|_| {
                let (a, b): (f32, f32) = (rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0));
                [a * 2.0 * 3f32.sqrt(), b * 3f32.sqrt()]
            })
            .collect();
        let g = Gaussian::fit(&vectors, 2, &RobustFit { trim: 0.0, rounds: 0, shrinkage: 1e-6 }).unwrap();
        let d = g.distance_squared(&[2.0, 1.0]);
        assert!((d - 2.0).abs() < 0.05, "(2,1) with variances (4,1) is at d² = 2, got {d}");
    }

    #[test]
    fn each_cell_gets_its_own_gaussian() {
        // Two cells, 300 frames: cell 0 around (0, 0), cell 1 around (10, 0).
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut vectors = Vec::new();
        for _ in 0..300 {
            for centre in [0.0f32, 10.0] {
                vectors.extend([centre + rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0)]);
            }
        }
        let fit = RobustFit { trim: 0.1, rounds: 2, shrinkage: 1e-3 };
        let model = PerPosition::fit(&vectors, 2, [1, 2], &fit).unwrap();
        let typical_of_cell_1 = [10.0f32, 0.0];
        assert!(model.at(1).distance_squared(&typical_of_cell_1) < 1.0);
        assert!(model.at(0).distance_squared(&typical_of_cell_1) > 100.0);
        let e = PerPosition::fit(&vectors[..2 * 2 * 2], 2, [1, 2], &fit).unwrap_err();
        assert!(e.contains("feature cell 0"), "{e}");
    }

    #[test]
    fn too_few_vectors_or_bad_settings_are_refused() {
        assert!(Gaussian::fit(&[0.0; 8], 4, &RobustFit { trim: 0.0, rounds: 0, shrinkage: 0.01 }).is_err());
        assert!(RobustFit { trim: 0.6, rounds: 1, shrinkage: 0.01 }.validate().is_err());
        assert!(RobustFit { trim: 0.1, rounds: 1, shrinkage: 0.0 }.validate().is_err());
        assert!(RobustFit { trim: 0.1, rounds: 3, shrinkage: 0.01 }.validate().is_ok());
    }
}

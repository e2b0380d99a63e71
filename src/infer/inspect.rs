//! A batch of prepared frames through the model: reconstruction, then post-processing.
//!
//! This is the one inspection path: `infer`, `eval` and the daemon's inference worker
//! all call [`Inspector::inspect`], so a verdict means the same everywhere.

use crate::infer::reconstruct::{ReconstructionSpec, Reconstructor};
use crate::infer::runtime::RuntimeError;
use crate::model::bundle::{Bundle, BundleError};
use crate::model::manifest::Manifest;
use crate::postprocess::anomaly::{Analysis, analyse};

/// A loaded bundle with its reconstructor and reusable batch buffers.
pub struct Inspector {
    pub bundle: Bundle,
    reconstructor: Reconstructor,
    batch: Vec<f32>,
    recon: Vec<f32>,
}

impl Inspector {
    /// `spec` overrides the manifest's reconstruction settings.
    pub fn new(bundle: Bundle, spec: Option<ReconstructionSpec>) -> Result<Self, BundleError> {
        let reconstructor = bundle.reconstructor(spec)?;
        Ok(Self { bundle, reconstructor, batch: Vec::new(), recon: Vec::new() })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.bundle.manifest
    }

    pub fn spec(&self) -> &ReconstructionSpec {
        self.reconstructor.spec()
    }

    /// UNet evaluations per frame.
    pub fn unet_calls(&self) -> usize {
        self.reconstructor.unet_calls()
    }

    /// Inspects frames given as `[C, H, W]` model-space tensors of the bundle's input size;
    /// `seeds[i]` seeds frame `i`'s reconstruction noise.
    pub fn inspect(&mut self, frames: &[&[f32]], seeds: &[u64]) -> Result<Vec<Analysis>, RuntimeError> {
        let input = self.bundle.manifest.input;
        let frame_len = input.frame_len();
        assert!(frames.iter().all(|f| f.len() == frame_len) && frames.len() == seeds.len(), "inspect: shapes");
        self.batch.clear();
        for frame in frames {
            self.batch.extend_from_slice(frame);
        }
        self.recon.resize(self.batch.len(), 0.0);
        self.reconstructor.reconstruct(
            &mut self.bundle.denoiser,
            &self.batch,
            [frames.len(), input.channels, input.height, input.width],
            seeds,
            &mut self.recon,
        )?;
        let manifest = &self.bundle.manifest;
        Ok((0..frames.len())
            .map(|i| {
                let range = i * frame_len..(i + 1) * frame_len;
                analyse(
                    &self.batch[range.clone()],
                    &self.recon[range],
                    [input.channels, input.height, input.width],
                    &manifest.anomaly,
                    &manifest.thresholds.pixel,
                    &manifest.thresholds.image,
                )
            })
            .collect())
    }
}

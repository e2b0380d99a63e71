//! Training frames: finding them in the supported layouts, decoding them through the
//! model core's preprocessing, and drawing augmented batches.
//!
//! Layouts (detected in this order, or forced with `--layout`):
//! - `mvtec`: `<dir>/train/good/` (MVTec AD);
//! - `captures`: the daemon's capture store, `<dir>/<camera>/{normal,flagged}/*.png`
//!   (with `*_mask.png` and `*.json` sidecars, which are skipped) — recognised by the
//!   `CAPTURE_STORE_MARKER` file the daemon writes at its root; frames an operator labelled
//!   `defect` (`capture::labels`) are left out and counted;
//! - `folder`: anomalib's Folder layout, the normal images in `<dir>/good/` or `<dir>/normal/`;
//! - `images`: any folder of images, recursively.
//!
//! Frames are unlabelled and may be contaminated; that is what the robust losses are for.
//! Unreadable files are skipped and listed, never fatal; an empty result is an error.

use std::path::{Path, PathBuf};

use image::DynamicImage;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::capture::labels::{Verdict, verdict_of};
use crate::image_files::{MAX_FILE_PIXELS, list_images, open_within};
use crate::model::preprocess::InputSpec;

/// File the daemon's recorder writes at the root of its capture store.
pub use crate::capture::STORE_MARKER as CAPTURE_STORE_MARKER;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Mvtec,
    Captures,
    Folder,
    Images,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: data directory not found")]
    NotFound { path: PathBuf },
    #[error("{path}: no usable training images ({layout:?} layout; {skipped} unreadable)")]
    Empty { path: PathBuf, layout: Layout, skipped: usize },
    #[error("{path}: cannot list directory: {source}")]
    List { path: PathBuf, source: std::io::Error },
}

/// Augmentations applied when a batch is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Augment {
    /// Random horizontal and vertical flips.
    pub flips: bool,
    /// Side of a random square crop (source pixels) taken before the resize; `None` uses
    /// the whole frame.
    pub random_crop: Option<u32>,
}

/// A skipped file and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Decoded training frames.
pub struct Dataset {
    pub layout: Layout,
    pub files: Vec<PathBuf>,
    /// Decoded at native resolution (cropping needs the source pixels).
    images: Vec<DynamicImage>,
    pub skipped: Vec<Skipped>,
    /// Capture-store frames an operator labelled `defect`: left out.
    pub labelled_defect: usize,
    input: InputSpec,
}

fn collect(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let found = list_images(dir, recursive).map_err(|(path, source)| DataError::List { path, source })?;
    out.extend(found);
    Ok(())
}

/// Detects the layout of `dir`.
pub fn detect(dir: &Path) -> Layout {
    if dir.join("train/good").is_dir() {
        Layout::Mvtec
    } else if dir.join(CAPTURE_STORE_MARKER).is_file() {
        Layout::Captures
    } else if dir.join("good").is_dir() || dir.join("normal").is_dir() {
        Layout::Folder
    } else {
        Layout::Images
    }
}

/// The image files of `dir` under `layout`, sorted for reproducibility.
pub fn list(dir: &Path, layout: Layout) -> Result<Vec<PathBuf>, DataError> {
    if !dir.is_dir() {
        return Err(DataError::NotFound { path: dir.to_path_buf() });
    }
    let mut files = Vec::new();
    match layout {
        Layout::Mvtec => collect(&dir.join("train/good"), false, &mut files)?,
        Layout::Folder => {
            let normal = if dir.join("good").is_dir() { dir.join("good") } else { dir.join("normal") };
            collect(&normal, true, &mut files)?;
        }
        Layout::Captures => {
            let cameras =
                std::fs::read_dir(dir).map_err(|source| DataError::List { path: dir.to_path_buf(), source })?;
            for camera in cameras.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
                for class in ["normal", "flagged"] {
                    if camera.join(class).is_dir() {
                        collect(&camera.join(class), true, &mut files)?;
                    }
                }
            }
        }
        Layout::Images => collect(dir, true, &mut files)?,
    }
    files.sort();
    Ok(files)
}

impl Dataset {
    /// Lists and decodes the frames of `dir`.
    pub fn load(dir: &Path, layout: Option<Layout>, input: InputSpec) -> Result<Self, DataError> {
        let layout = layout.unwrap_or_else(|| detect(dir));
        let mut candidates = list(dir, layout)?;
        let listed = candidates.len();
        if layout == Layout::Captures {
            candidates.retain(|frame| verdict_of(frame) != Some(Verdict::Defect));
        }
        let labelled_defect = listed - candidates.len();
        if labelled_defect > 0 {
            tracing::info!(frames = labelled_defect, "Frames labelled defect by an operator left out.");
        }
        let mut files = Vec::new();
        let mut images = Vec::new();
        let mut skipped = Vec::new();
        for path in candidates {
            match open_within(&path, MAX_FILE_PIXELS) {
                Ok(img) if img.width() > 0 && img.height() > 0 => {
                    files.push(path);
                    images.push(img);
                }
                Ok(_) => skipped.push(Skipped { path: path.display().to_string(), reason: "empty image".into() }),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "Training image skipped.");
                    skipped.push(Skipped { path: path.display().to_string(), reason: e.to_string() });
                }
            }
        }
        if images.is_empty() {
            return Err(DataError::Empty { path: dir.to_path_buf(), layout, skipped: skipped.len() });
        }
        Ok(Self { layout, files, images, skipped, labelled_defect, input })
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Frame `i` as the model sees it at inference, without random augmentation: the whole
    /// frame, or, when training on crops, every full crop-sized tile of it (so calibration
    /// sees the same scale as training).
    pub fn frames_for_calibration(&self, i: usize, augment: &Augment) -> Vec<Vec<f32>> {
        let image = &self.images[i];
        match augment.random_crop {
            Some(side) if side < image.width().min(image.height()) => {
                let mut tiles = Vec::new();
                for y in (0..=image.height() - side).step_by(side as usize) {
                    for x in (0..=image.width() - side).step_by(side as usize) {
                        tiles.push(self.input.prepare(&image.crop_imm(x, y, side, side)).tensor);
                    }
                }
                tiles
            }
            _ => vec![self.input.prepare(image).tensor],
        }
    }

    /// Frame `i` with random crop and flips drawn from `rng`.
    pub fn augmented(&self, i: usize, augment: &Augment, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let image = &self.images[i];
        let cropped;
        let source = match augment.random_crop {
            Some(side) if side < image.width().min(image.height()) => {
                let x = rng.random_range(0..=image.width() - side);
                let y = rng.random_range(0..=image.height() - side);
                cropped = image.crop_imm(x, y, side, side);
                &cropped
            }
            _ => image,
        };
        let mut tensor = self.input.prepare(source).tensor;
        if augment.flips {
            let (c, h, w) = (self.input.channels, self.input.height, self.input.width);
            if rng.random_bool(0.5) {
                for row in tensor.chunks_mut(w) {
                    row.reverse();
                }
            }
            if rng.random_bool(0.5) {
                for plane in tensor.chunks_mut(h * w).take(c) {
                    for y in 0..h / 2 {
                        let (top, bottom) = plane.split_at_mut((h - 1 - y) * w);
                        top[y * w..(y + 1) * w].swap_with_slice(&mut bottom[..w]);
                    }
                }
            }
        }
        tensor
    }

    /// sha256 over the sorted per-file sha256s: identifies the training data.
    pub fn fingerprint(&self) -> std::io::Result<String> {
        let mut hashes = Vec::with_capacity(self.files.len());
        for f in &self.files {
            hashes.push(crate::infer::bundle::sha256_hex(&std::fs::read(f)?));
        }
        hashes.sort();
        Ok(crate::infer::bundle::sha256_hex(hashes.join("\n").as_bytes()))
    }
}

//! Image → model tensor, the one implementation used by `infer`, `run`, `retrain` and `eval`.
//!
//! Mismatched preprocessing between training and deployment is the most common way an
//! anomaly model "works in the notebook" and fails on the line; so the manifest's
//! [`InputSpec`] is the only input to this module and every subcommand goes through it.

use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};
use serde::{Deserialize, Serialize};

/// Resampling filter for the resize to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeFilter {
    Nearest,
    Triangle,
    CatmullRom,
}

impl From<ResizeFilter> for FilterType {
    fn from(f: ResizeFilter) -> Self {
        match f {
            ResizeFilter::Nearest => FilterType::Nearest,
            ResizeFilter::Triangle => FilterType::Triangle,
            ResizeFilter::CatmullRom => FilterType::CatmullRom,
        }
    }
}

/// What the model expects as input; stored in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub width: usize,
    pub height: usize,
    /// 1 = greyscale (luma), 3 = RGB.
    pub channels: usize,
    pub resize_filter: ResizeFilter,
    /// `x = (pixel/255 − mean) / std`; 0.5/0.5 maps [0, 255] onto [−1, 1].
    pub mean: f32,
    pub std: f32,
}

impl Default for InputSpec {
    fn default() -> Self {
        Self { width: 64, height: 64, channels: 1, resize_filter: ResizeFilter::Triangle, mean: 0.5, std: 0.5 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("{path}: cannot read image: {source}")]
    Read { path: String, source: image::ImageError },
    #[error("{path}: image is empty (0×0)")]
    Empty { path: String },
}

/// A frame ready for the model, plus the resized picture for overlays.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `[C, H, W]` in model space.
    pub tensor: Vec<f32>,
    /// The frame at model resolution, as RGB for drawing.
    pub display: RgbImage,
}

impl InputSpec {
    /// Elements of one frame's tensor.
    pub fn frame_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Resizes and normalises a decoded image.
    pub fn prepare(&self, image: &DynamicImage) -> Prepared {
        let resized = image.resize_exact(self.width as u32, self.height as u32, self.resize_filter.into());
        let mut tensor = Vec::with_capacity(self.frame_len());
        let scale = |v: u8| (v as f32 / 255.0 - self.mean) / self.std;
        let display = if self.channels == 1 {
            let luma = resized.to_luma8();
            tensor.extend(luma.as_raw().iter().map(|v| scale(*v)));
            DynamicImage::ImageLuma8(luma).to_rgb8()
        } else {
            let rgb = resized.to_rgb8();
            for c in 0..3 {
                tensor.extend(rgb.pixels().map(|p| scale(p.0[c])));
            }
            rgb
        };
        Prepared { tensor, display }
    }

    /// Reads, decodes and prepares an image file.
    pub fn prepare_file(&self, path: &Path) -> Result<Prepared, PreprocessError> {
        let shown = path.display().to_string();
        let image = image::ImageReader::open(path)
            .map_err(|e| PreprocessError::Read { path: shown.clone(), source: image::ImageError::IoError(e) })?
            .with_guessed_format()
            .map_err(|e| PreprocessError::Read { path: shown.clone(), source: image::ImageError::IoError(e) })?
            .decode()
            .map_err(|source| PreprocessError::Read { path: shown.clone(), source })?;
        if image.width() == 0 || image.height() == 0 {
            return Err(PreprocessError::Empty { path: shown });
        }
        Ok(self.prepare(&image))
    }

    /// Model-space value back to an 8-bit pixel.
    pub fn to_pixel(&self, v: f32) -> u8 {
        ((v * self.std + self.mean) * 255.0).round().clamp(0.0, 255.0) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma};

    #[test]
    fn grey_frames_map_onto_minus_one_to_one() {
        let spec = InputSpec { width: 2, height: 1, ..InputSpec::default() };
        let img = DynamicImage::ImageLuma8(GrayImage::from_fn(2, 1, |x, _| Luma([if x == 0 { 0 } else { 255 }])));
        let p = spec.prepare(&img);
        assert_eq!(p.tensor, vec![-1.0, 1.0]);
        assert_eq!(spec.to_pixel(p.tensor[1]), 255);
    }

    #[test]
    fn rgb_frames_are_planar() {
        let spec = InputSpec { width: 1, height: 1, channels: 3, ..InputSpec::default() };
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(1, 1, image::Rgb([255, 0, 51])));
        assert_eq!(spec.prepare(&img).tensor, vec![1.0, -1.0, -0.6]);
    }
}

//! Image → model tensor, the one implementation used by `infer`, `run`, `retrain` and `eval`.
//!
//! Mismatched preprocessing between training and deployment is the most common way an
//! anomaly model "works in the notebook" and fails on the line; so the manifest's
//! [`InputSpec`] (with the [`Inspection`] mode: whole-frame resize or tiles at a scale)
//! is the only input to this module and every subcommand goes through it.

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

/// How a model sees a camera frame; stored in the manifest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Inspection {
    /// The whole frame (or ROI) is resized to the model's input: models trained on
    /// whole-frame thumbnails (every bundle from before tiling).
    #[default]
    Resize,
    /// The frame is scaled by `scale` (model pixels per camera pixel; 1 = native) and cut
    /// into model-size tiles whose starts are `stride` model pixels apart.
    Tiled { scale: f64, stride: usize },
}

impl Inspection {
    pub fn validate(&self, tile: [usize; 2]) -> Result<(), String> {
        match *self {
            Self::Resize => Ok(()),
            Self::Tiled { scale, stride } => {
                if !(scale.is_finite() && scale > 0.0 && scale <= 16.0) {
                    return Err(format!("inspection.scale must be in (0, 16], got {scale}"));
                }
                if stride == 0 || stride > tile[0].min(tile[1]) {
                    return Err(format!(
                        "inspection.stride must be in 1..={} (the tile size), got {stride}",
                        tile[0].min(tile[1])
                    ));
                }
                Ok(())
            }
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
    #[error("{path}: {width}x{height} is over the limit of {limit} pixels; not decoded")]
    TooLarge { path: String, width: u32, height: u32, limit: u64 },
}

/// A frame ready for the model, plus the resized picture for overlays.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `[C, H, W]` in model space.
    pub tensor: Vec<f32>,
    /// The frame at inspection resolution, as RGB for drawing.
    pub display: RgbImage,
}

impl Prepared {
    /// `[height, width]` of the prepared frame.
    pub fn size(&self) -> [usize; 2] {
        [self.display.height() as usize, self.display.width() as usize]
    }
}

impl InputSpec {
    /// Elements of one frame's tensor.
    pub fn frame_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Resizes and normalises a decoded image to the model's input size.
    pub fn prepare(&self, image: &DynamicImage) -> Prepared {
        self.normalise(&image.resize_exact(self.width as u32, self.height as u32, self.resize_filter.into()))
    }

    /// Prepares a decoded image as `inspection` says: resized to the input size, or scaled
    /// by the model's pixel scale for tiling (unchanged at scale 1). A frame that would be
    /// smaller than one tile in either direction is resized to exactly one tile, as an
    /// untiled model would see it.
    pub fn prepare_for(&self, inspection: Inspection, image: &DynamicImage) -> Prepared {
        let Inspection::Tiled { scale, .. } = inspection else {
            return self.prepare(image);
        };
        let (width, height) =
            ((image.width() as f64 * scale).round() as usize, (image.height() as f64 * scale).round() as usize);
        if width < self.width || height < self.height {
            return self.prepare(image);
        }
        if (width, height) == (image.width() as usize, image.height() as usize) {
            return self.normalise(image);
        }
        self.normalise(&image.resize_exact(width as u32, height as u32, self.resize_filter.into()))
    }

    /// Normalises an image of any size into a `[C, H, W]` model-space tensor.
    fn normalise(&self, resized: &DynamicImage) -> Prepared {
        let mut tensor = Vec::with_capacity(self.channels * resized.width() as usize * resized.height() as usize);
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

    /// Reads, decodes and prepares an image file as `inspection` says.
    pub fn prepare_file(&self, inspection: Inspection, path: &Path) -> Result<Prepared, PreprocessError> {
        let shown = path.display().to_string();
        use crate::image_files::{DecodeError, MAX_FILE_PIXELS, open_within};
        let image = open_within(path, MAX_FILE_PIXELS).map_err(|e| match e {
            DecodeError::TooLarge { width, height, limit } => {
                PreprocessError::TooLarge { path: shown.clone(), width, height, limit }
            }
            DecodeError::Image(source) => PreprocessError::Read { path: shown.clone(), source },
        })?;
        if image.width() == 0 || image.height() == 0 {
            return Err(PreprocessError::Empty { path: shown });
        }
        Ok(self.prepare_for(inspection, &image))
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
    fn tiled_inspection_keeps_native_size_and_resizes_frames_below_one_tile() {
        let spec = InputSpec { width: 4, height: 4, ..InputSpec::default() };
        let tiled = Inspection::Tiled { scale: 1.0, stride: 3 };
        let big = DynamicImage::ImageLuma8(GrayImage::from_fn(10, 6, |x, y| Luma([(x * 20 + y) as u8])));
        let p = spec.prepare_for(tiled, &big);
        assert_eq!(p.size(), [6, 10]);
        assert_eq!(p.tensor.len(), 60);
        assert_eq!(spec.to_pixel(p.tensor[10 + 3]), 61, "native pixels are kept");
        let half = spec.prepare_for(Inspection::Tiled { scale: 0.5, stride: 3 }, &big);
        assert_eq!(half.size(), [4, 4], "6×10 at scale ½ is 3×5: below one tile, resized to it");
        let twice = spec.prepare_for(Inspection::Tiled { scale: 2.0, stride: 3 }, &big);
        assert_eq!(twice.size(), [12, 20]);
        assert_eq!(spec.prepare_for(Inspection::Resize, &big).size(), [4, 4]);
    }

    #[test]
    fn inspection_settings_are_checked() {
        assert!(Inspection::Tiled { scale: 1.0, stride: 48 }.validate([64, 64]).is_ok());
        assert!(Inspection::Tiled { scale: 0.0, stride: 48 }.validate([64, 64]).is_err());
        assert!(Inspection::Tiled { scale: f64::NAN, stride: 48 }.validate([64, 64]).is_err());
        assert!(Inspection::Tiled { scale: 1.0, stride: 65 }.validate([64, 64]).is_err());
        assert!(Inspection::Tiled { scale: 1.0, stride: 0 }.validate([64, 64]).is_err());
    }

    #[test]
    fn rgb_frames_are_planar() {
        let spec = InputSpec { width: 1, height: 1, channels: 3, ..InputSpec::default() };
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(1, 1, image::Rgb([255, 0, 51])));
        assert_eq!(spec.prepare(&img).tensor, vec![1.0, -1.0, -0.6]);
    }
}

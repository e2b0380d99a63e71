//! Labelled evaluation data: finding test images and their ground-truth masks, checking
//! that they fit together and fit the model, and decoding them at model resolution.
//!
//! Layouts:
//! - MVTec AD: `<dir>/test/<type>/*.png`, `<dir>/ground_truth/<type>/<stem>_mask.png`;
//!   `good` images have no mask (all normal).
//! - anomalib Folder: normal images in `good/` (or `normal/`), anomalous ones in `bad/`,
//!   `abnormal/` or `defect/` (sub-folders name defect types), masks optional in `mask/`
//!   (or `masks/`, `ground_truth/`) under the image's file name or as `<stem>_mask.png`.
//!
//! Every mismatch is an error naming the file: a defect image without a mask, a mask of
//! another size than its image, images of another size than the model (unless resizing
//! was asked for). Unreadable images are skipped and listed, as everywhere else.

use std::path::{Path, PathBuf};

use image::GrayImage;
use serde::Serialize;

use crate::capture::labels::{Verdict, verdict_of};
use crate::image_files::{MAX_FILE_PIXELS, list_images, open_within};
use crate::model::preprocess::{InputSpec, Inspection};

/// The defect type of normal images.
pub const NORMAL: &str = "good";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalLayout {
    Mvtec,
    Folder,
    /// The daemon's capture store: the frames an operator labelled (`capture::labels`).
    Captures,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalDataError {
    #[error("{path}: evaluation data directory not found")]
    NotFound { path: PathBuf },
    #[error(
        "{path}: not an evaluation dataset: expected an MVTec category (test/<type>/, ground_truth/<type>/) \
         or an anomalib Folder layout (good/ and bad/, abnormal/ or defect/)"
    )]
    Malformed { path: PathBuf },
    #[error("{path}: cannot list directory: {source}")]
    List { path: PathBuf, source: std::io::Error },
    #[error("{path}: no {what} images found")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{image}: anomalous image has no ground-truth mask (looked for {expected})")]
    MissingMask { image: PathBuf, expected: PathBuf },
    #[error("{mask}: mask is {mask_width}x{mask_height} but its image {image} is {width}x{height}")]
    MaskSize { mask: PathBuf, mask_width: u32, mask_height: u32, image: PathBuf, width: u32, height: u32 },
    #[error(
        "{image}: image is {width}x{height} but the model expects {model_width}x{model_height} \
         (pass --resize to resize images and masks to the model's input)"
    )]
    ImageSize { image: PathBuf, width: u32, height: u32, model_width: usize, model_height: usize },
    #[error(
        "{image}: image is {width}x{height}, smaller than one {model_width}x{model_height} tile at the model's \
         scale {scale} (pass --resize to scale such images up to one tile)"
    )]
    SmallerThanTile { image: PathBuf, width: u32, height: u32, model_width: usize, model_height: usize, scale: f64 },
    #[error("{path}: cannot read mask: {reason}")]
    Mask { path: PathBuf, reason: String },
}

/// One test image and what it should be.
#[derive(Debug, Clone)]
pub struct Sample {
    pub image: PathBuf,
    /// `None` for normal images, and for anomalous ones in a Folder dataset without masks.
    pub mask: Option<PathBuf>,
    /// [`NORMAL`] or the defect type.
    pub defect_type: String,
}

impl Sample {
    pub fn is_anomalous(&self) -> bool {
        self.defect_type != NORMAL
    }
}

/// The test samples of a dataset and whether pixel ground truth exists.
#[derive(Debug)]
pub struct EvalSet {
    pub layout: EvalLayout,
    pub samples: Vec<Sample>,
    /// Every anomalous image has a mask (pixel metrics are defined).
    pub has_masks: bool,
}

/// A sample decoded at model resolution.
pub struct Loaded {
    pub tensor: Vec<f32>,
    pub display: image::RgbImage,
    /// 0/1 per image pixel (native resolution).
    pub truth: Vec<u8>,
    /// `[height, width]` of the image (and `truth`).
    pub size: [usize; 2],
    /// `[height, width]` of the inspected frame (`tensor`, `display`).
    pub inspected: [usize; 2],
}

fn list(dir: &Path) -> Result<Vec<PathBuf>, EvalDataError> {
    list_images(dir, false).map_err(|(path, source)| EvalDataError::List { path, source })
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, EvalDataError> {
    let entries = std::fs::read_dir(dir).map_err(|source| EvalDataError::List { path: dir.to_path_buf(), source })?;
    let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    Ok(dirs)
}

fn name_of(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn stem_of(path: &Path) -> String {
    path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn first_dir(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_dir())
}

/// Finds the test samples of `dir`.
pub fn discover(dir: &Path) -> Result<EvalSet, EvalDataError> {
    if !dir.is_dir() {
        return Err(EvalDataError::NotFound { path: dir.to_path_buf() });
    }
    let (layout, samples) = if dir.join(crate::capture::STORE_MARKER).is_file() {
        (EvalLayout::Captures, discover_labelled(dir)?)
    } else if dir.join("test").is_dir() {
        (EvalLayout::Mvtec, discover_mvtec(dir)?)
    } else if let (Some(normal), Some(abnormal)) =
        (first_dir(dir, &["good", "normal"]), first_dir(dir, &["bad", "abnormal", "defect"]))
    {
        (EvalLayout::Folder, discover_folder(dir, &normal, &abnormal)?)
    } else {
        return Err(EvalDataError::Malformed { path: dir.to_path_buf() });
    };
    if !samples.iter().any(|s| !s.is_anomalous()) {
        return Err(EvalDataError::Empty { path: dir.to_path_buf(), what: "normal test" });
    }
    if !samples.iter().any(Sample::is_anomalous) {
        return Err(EvalDataError::Empty { path: dir.to_path_buf(), what: "anomalous test" });
    }
    let has_masks = samples.iter().filter(|s| s.is_anomalous()).all(|s| s.mask.is_some());
    Ok(EvalSet { layout, samples, has_masks })
}

/// Labelled recordings of a capture store: `normal` ones as good, `defect` ones as the type
/// `labelled`, without masks (an operator judges frames, not pixels); unlabelled ones are left
/// out.
fn discover_labelled(dir: &Path) -> Result<Vec<Sample>, EvalDataError> {
    let mut samples = Vec::new();
    for camera in subdirs(dir)? {
        for class in ["flagged", "normal"] {
            if !camera.join(class).is_dir() {
                continue;
            }
            for image in list(&camera.join(class))? {
                let defect_type = match verdict_of(&image) {
                    Some(Verdict::Normal) => NORMAL,
                    Some(Verdict::Defect) => "labelled",
                    None => continue,
                };
                samples.push(Sample { image, mask: None, defect_type: defect_type.into() });
            }
        }
    }
    samples.sort_by(|a, b| a.image.cmp(&b.image));
    Ok(samples)
}

fn discover_mvtec(dir: &Path) -> Result<Vec<Sample>, EvalDataError> {
    let mut samples = Vec::new();
    for type_dir in subdirs(&dir.join("test"))? {
        let defect_type = name_of(&type_dir);
        for image in list(&type_dir)? {
            let mask = if defect_type == NORMAL {
                None
            } else {
                let expected =
                    dir.join("ground_truth").join(&defect_type).join(format!("{}_mask.png", stem_of(&image)));
                if !expected.is_file() {
                    return Err(EvalDataError::MissingMask { image, expected });
                }
                Some(expected)
            };
            samples.push(Sample { image, mask, defect_type: defect_type.clone() });
        }
    }
    Ok(samples)
}

fn discover_folder(dir: &Path, normal: &Path, abnormal: &Path) -> Result<Vec<Sample>, EvalDataError> {
    let mask_dir = first_dir(dir, &["mask", "masks", "ground_truth"]);
    let mut samples: Vec<Sample> =
        list(normal)?.into_iter().map(|image| Sample { image, mask: None, defect_type: NORMAL.into() }).collect();
    let mut groups = vec![(name_of(abnormal), abnormal.to_path_buf())];
    groups.extend(subdirs(abnormal)?.into_iter().map(|d| (name_of(&d), d)));
    for (defect_type, group_dir) in groups {
        for image in list(&group_dir)? {
            let mask = match &mask_dir {
                None => None,
                Some(masks) => {
                    let relative = image.strip_prefix(abnormal).unwrap_or(&image);
                    let same_name = masks.join(relative);
                    let suffixed = same_name.with_file_name(format!("{}_mask.png", stem_of(&image)));
                    if same_name.is_file() {
                        Some(same_name)
                    } else if suffixed.is_file() {
                        Some(suffixed)
                    } else {
                        return Err(EvalDataError::MissingMask { image, expected: same_name });
                    }
                }
            };
            samples.push(Sample { image, mask, defect_type: defect_type.clone() });
        }
    }
    Ok(samples)
}

fn read_mask(path: &Path) -> Result<GrayImage, EvalDataError> {
    let reason = |e: &dyn std::fmt::Display| EvalDataError::Mask { path: path.to_path_buf(), reason: e.to_string() };
    Ok(open_within(path, MAX_FILE_PIXELS).map_err(|e| reason(&e))?.to_luma8())
}

/// Checks an image's (and its mask's) size from the file headers, before any inference.
/// An unreadable image passes here; it is skipped and reported when loaded. A tiled model
/// takes any size of at least one tile at its scale; a resize model its input size (with
/// `resize`, anything).
pub fn check_sizes(
    sample: &Sample,
    input: &InputSpec,
    inspection: Inspection,
    resize: bool,
) -> Result<(), EvalDataError> {
    let Ok((width, height)) = image::image_dimensions(&sample.image) else {
        return Ok(());
    };
    let (model_width, model_height) = (input.width, input.height);
    match inspection {
        _ if resize => {}
        Inspection::Resize if width as usize != model_width || height as usize != model_height => {
            return Err(EvalDataError::ImageSize {
                image: sample.image.clone(),
                width,
                height,
                model_width,
                model_height,
            });
        }
        Inspection::Tiled { scale, .. }
            if (width as f64 * scale).round() < model_width as f64
                || (height as f64 * scale).round() < model_height as f64 =>
        {
            return Err(EvalDataError::SmallerThanTile {
                image: sample.image.clone(),
                width,
                height,
                model_width,
                model_height,
                scale,
            });
        }
        _ => {}
    }
    if let Some(mask) = &sample.mask {
        let (mask_width, mask_height) = image::image_dimensions(mask)
            .map_err(|e| EvalDataError::Mask { path: mask.clone(), reason: e.to_string() })?;
        if (mask_width, mask_height) != (width, height) {
            return Err(EvalDataError::MaskSize {
                mask: mask.clone(),
                mask_width,
                mask_height,
                image: sample.image.clone(),
                width,
                height,
            });
        }
    }
    Ok(())
}

/// Decodes `sample` for inspection (the model's input size, or the scaled frame for a tiled
/// model) and its mask at the image's own size (sizes were checked by [`check_sizes`]), so
/// pixel metrics are at native resolution whatever the model does.
/// `Ok(Err(reason))` is an unreadable image, which the caller skips; `Err` is a dataset
/// error that stops the evaluation.
pub fn load(
    sample: &Sample,
    input: &InputSpec,
    inspection: Inspection,
) -> Result<Result<Loaded, String>, EvalDataError> {
    let image = match open_within(&sample.image, MAX_FILE_PIXELS).map_err(|e| e.to_string()) {
        Ok(image) => image,
        Err(reason) => return Ok(Err(reason)),
    };
    let prepared = input.prepare_for(inspection, &image);
    let [height, width] = [image.height() as usize, image.width() as usize];
    let truth = match &sample.mask {
        None => vec![0u8; width * height],
        Some(path) => read_mask(path)?.as_raw().iter().map(|v| u8::from(*v > 127)).collect(),
    };
    Ok(Ok(Loaded {
        size: [height, width],
        inspected: prepared.size(),
        tensor: prepared.tensor,
        display: prepared.display,
        truth,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        GrayImage::new(8, 8).save(path).unwrap();
    }

    #[test]
    fn anomalib_folder_layout_with_types_and_masks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        image(&root.join("good/a.png"));
        image(&root.join("bad/b.png"));
        image(&root.join("bad/crack/c.png"));
        image(&root.join("mask/b.png")); // same file name
        image(&root.join("mask/crack/c_mask.png")); // MVTec-style suffix
        let set = discover(root).unwrap();
        assert_eq!(set.layout, EvalLayout::Folder);
        assert!(set.has_masks);
        let found: Vec<(String, bool)> = set
            .samples
            .iter()
            .map(|s| {
                (format!("{}:{}", s.defect_type, s.image.file_name().unwrap().to_string_lossy()), s.mask.is_some())
            })
            .collect();
        assert_eq!(
            found,
            [("good:a.png".to_string(), false), ("bad:b.png".to_string(), true), ("crack:c.png".to_string(), true)]
        );
        std::fs::remove_file(root.join("mask/crack/c_mask.png")).unwrap();
        let e = discover(root).unwrap_err().to_string();
        assert!(e.contains("crack/c.png") && e.contains("no ground-truth mask"), "{e}");
        // Without a mask directory the pixel metrics are simply not defined.
        std::fs::remove_dir_all(root.join("mask")).unwrap();
        assert!(!discover(root).unwrap().has_masks);
    }
}

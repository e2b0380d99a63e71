//! A camera's static inspection mask: which pixels of its frames (after the ROI) are
//! inspected. A greyscale image the size of the camera's frames (or of its ROI), non-zero
//! where the line engineer wants defects found and 0 where the frame shows something else
//! (a fixture, a conveyor edge, a label that changes per part). Tiles that hold no
//! inspected pixel are never computed, and no pixel outside it scores or alerts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::GrayImage;

/// The largest mask side accepted, as for frames: a bound on what a file can make us allocate.
const MAX_SIDE: u32 = 1 << 15;

/// A loaded mask; equal when its path and pixels are.
#[derive(Debug, Clone, PartialEq)]
pub struct InspectMask {
    path: PathBuf,
    image: Arc<GrayImage>,
}

impl InspectMask {
    /// Reads `path`; an unreadable or oversized file, or one without any inspected pixel,
    /// is an error naming it.
    pub fn load(path: &Path) -> Result<Self, String> {
        let reader = image::ImageReader::open(path)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| format!("{}: cannot open the mask: {e}", path.display()))?;
        let (width, height) = reader.into_dimensions().map_err(|e| format!("{}: not an image: {e}", path.display()))?;
        if width > MAX_SIDE || height > MAX_SIDE {
            return Err(format!("{}: the mask is {width}x{height}, over {MAX_SIDE} pixels a side", path.display()));
        }
        let image = image::open(path).map_err(|e| format!("{}: cannot decode the mask: {e}", path.display()))?;
        let image = image.to_luma8();
        if image.as_raw().iter().all(|&v| v == 0) {
            return Err(format!("{}: the mask inspects no pixel (all 0)", path.display()));
        }
        Ok(Self { path: path.to_path_buf(), image: Arc::new(image) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `[width, height]`: the size of the frames (after the ROI) it applies to.
    pub fn size(&self) -> [u32; 2] {
        [self.image.width(), self.image.height()]
    }

    /// The mask at a prepared frame's `[height, width]` (nearest neighbour): 1 where inspected.
    pub fn at(&self, [height, width]: [usize; 2]) -> Vec<u8> {
        let resized = if [width as u32, height as u32] == self.size() {
            (*self.image).clone()
        } else {
            image::imageops::resize(&*self.image, width as u32, height as u32, image::imageops::FilterType::Nearest)
        };
        resized.into_raw().into_iter().map(|v| u8::from(v != 0)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_loads_bounded_and_scales_to_the_prepared_frame() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mask.png");
        // The left half of a 4×2 frame is inspected.
        GrayImage::from_fn(4, 2, |x, _| image::Luma([if x < 2 { 255 } else { 0 }])).save(&path).unwrap();
        let mask = InspectMask::load(&path).unwrap();
        assert_eq!(mask.size(), [4, 2]);
        assert_eq!(mask.at([2, 4]), [1, 1, 0, 0, 1, 1, 0, 0]);
        assert_eq!(mask.at([1, 2]), [1, 0], "halved: one inspected, one not");
        GrayImage::new(3, 3).save(&path).unwrap();
        assert!(InspectMask::load(&path).unwrap_err().contains("inspects no pixel"));
        std::fs::write(&path, b"not a png").unwrap();
        assert!(InspectMask::load(&path).unwrap_err().contains("mask.png"));
        assert!(InspectMask::load(&dir.path().join("missing.png")).unwrap_err().contains("missing.png"));
    }
}

//! Replay of image files as a camera: a folder (sorted) or a glob pattern.
//!
//! Used for demos, for tests of the whole daemon, and to re-run a line's recorded frames
//! through a new model. Pacing (fps) is the capture loop's job, not the source's, so that a
//! slow replay still stops promptly on shutdown. The file list is taken when the source is
//! opened; looping re-opens, so files added meanwhile are picked up.

use std::path::PathBuf;

use image::DynamicImage;

use super::{CaptureError, FrameSource};
use crate::image_files::{is_image, list_images};

pub struct ReplaySource {
    camera: String,
    files: Vec<PathBuf>,
    next: usize,
    /// The file the last frame came from.
    current: Option<PathBuf>,
}

impl ReplaySource {
    /// Lists the frames of `path`: a folder, or a glob pattern if it contains `*`, `?` or `[`.
    pub fn open(camera: &str, path: &str) -> Result<Self, CaptureError> {
        let open_error = |reason: String| CaptureError::Open { camera: camera.into(), device: path.into(), reason };
        let files = if path.contains(['*', '?', '[']) {
            let mut files: Vec<PathBuf> = glob::glob(path)
                .map_err(|e| open_error(format!("bad glob pattern: {e}")))?
                .filter_map(Result::ok)
                .filter(|p| is_image(p))
                .collect();
            files.sort();
            files
        } else {
            list_images(std::path::Path::new(path), false).map_err(|(_, e)| open_error(e.to_string()))?
        };
        if files.is_empty() {
            return Err(open_error("no image files".into()));
        }
        Ok(Self { camera: camera.into(), files, next: 0, current: None })
    }
}

impl FrameSource for ReplaySource {
    fn camera(&self) -> &str {
        &self.camera
    }

    fn next_frame(&mut self) -> Result<DynamicImage, CaptureError> {
        let Some(path) = self.files.get(self.next).cloned() else {
            return Err(CaptureError::Ended { camera: self.camera.clone() });
        };
        self.next += 1;
        self.current = Some(path.clone());
        // A vanished file or folder means the source is gone (reopen); a file that is there
        // but does not decode is one bad frame (count and skip).
        let bytes = std::fs::read(&path).map_err(|e| CaptureError::Read {
            camera: self.camera.clone(),
            reason: format!("{}: {e}", path.display()),
        })?;
        image::load_from_memory(&bytes).map_err(|e| CaptureError::Corrupt {
            camera: self.camera.clone(),
            what: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    fn current_file(&self) -> Option<&PathBuf> {
        self.current.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_a_folder_in_order_then_ends() {
        let dir = tempfile::tempdir().unwrap();
        for (name, colour) in [("b.png", 200u8), ("a.png", 100)] {
            image::GrayImage::from_pixel(4, 3, image::Luma([colour])).save(dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join("c.png"), b"not a png").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
        let mut source = ReplaySource::open("cam", dir.path().to_str().unwrap()).unwrap();
        assert_eq!(source.next_frame().unwrap().to_luma8().get_pixel(0, 0).0[0], 100);
        assert_eq!(source.next_frame().unwrap().to_luma8().get_pixel(0, 0).0[0], 200);
        assert!(matches!(source.next_frame(), Err(CaptureError::Corrupt { .. })));
        assert!(source.current_file().unwrap().ends_with("c.png"));
        assert!(matches!(source.next_frame(), Err(CaptureError::Ended { .. })));
    }

    #[test]
    fn glob_and_missing_folder() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["x1.png", "x2.png", "y.png"] {
            image::GrayImage::new(2, 2).save(dir.path().join(name)).unwrap();
        }
        let pattern = format!("{}/x*.png", dir.path().display());
        let source = ReplaySource::open("cam", &pattern).unwrap();
        assert_eq!(source.files.len(), 2);
        let missing = ReplaySource::open("cam", "/nonexistent/frames").err().unwrap().to_string();
        assert!(missing.contains("camera 'cam'") && missing.contains("/nonexistent/frames"), "{missing}");
        let empty = tempfile::tempdir().unwrap();
        let e = ReplaySource::open("cam", empty.path().to_str().unwrap()).err().unwrap().to_string();
        assert!(e.contains("no image files"), "{e}");
    }

    #[test]
    fn a_vanished_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        image::GrayImage::new(2, 2).save(dir.path().join("a.png")).unwrap();
        let mut source = ReplaySource::open("cam", dir.path().to_str().unwrap()).unwrap();
        std::fs::remove_file(dir.path().join("a.png")).unwrap();
        assert!(matches!(source.next_frame(), Err(CaptureError::Read { .. })));
    }
}

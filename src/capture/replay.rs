//! Replay of image files as a camera: a folder (sorted) or a glob pattern.
//!
//! Used for demos, for tests of the whole daemon, and to re-run a line's recorded frames
//! through a new model. Pacing (fps) is the capture loop's job, not the source's, so that a
//! slow replay still stops promptly on shutdown. The file list is taken when the source is
//! opened; looping re-opens, so files added meanwhile are picked up.

use std::path::PathBuf;

use image::DynamicImage;

use super::{CaptureError, FrameSource};
use crate::image_files::{DecodeError, decode_within, is_image, list_images};

pub struct ReplaySource {
    camera: String,
    /// Frames with more pixels are refused from their header, before any decoding.
    max_pixels: u64,
    files: Vec<PathBuf>,
    next: usize,
    /// The file the last frame came from.
    current: Option<PathBuf>,
}

impl ReplaySource {
    /// Lists the frames of `path`: a folder, or a glob pattern if it contains `*`, `?` or `[`.
    pub fn open(camera: &str, path: &str, max_pixels: u64) -> Result<Self, CaptureError> {
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
        Ok(Self { camera: camera.into(), max_pixels, files, next: 0, current: None })
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
        self.decode(&bytes, &path.display().to_string())
    }

    fn current_file(&self) -> Option<&PathBuf> {
        self.current.as_ref()
    }
}

impl ReplaySource {
    /// Decodes a file's bytes within the camera's pixel limit: over it, the frame is refused
    /// from its header (`TooLarge`); undecodable, it is `Corrupt`.
    fn decode(&self, bytes: &[u8], what: &str) -> Result<DynamicImage, CaptureError> {
        decode_within(bytes, self.max_pixels).map_err(|e| match e {
            DecodeError::TooLarge { width, height, limit } => {
                CaptureError::TooLarge { camera: self.camera.clone(), what: what.to_string(), width, height, limit }
            }
            DecodeError::Image(e) => {
                CaptureError::Corrupt { camera: self.camera.clone(), what: what.to_string(), reason: e.to_string() }
            }
        })
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
        let mut source = ReplaySource::open("cam", dir.path().to_str().unwrap(), 1 << 20).unwrap();
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
        let source = ReplaySource::open("cam", &pattern, 1 << 20).unwrap();
        assert_eq!(source.files.len(), 2);
        let missing = ReplaySource::open("cam", "/nonexistent/frames", 1 << 20).err().unwrap().to_string();
        assert!(missing.contains("camera 'cam'") && missing.contains("/nonexistent/frames"), "{missing}");
        let empty = tempfile::tempdir().unwrap();
        let e = ReplaySource::open("cam", empty.path().to_str().unwrap(), 1 << 20).err().unwrap().to_string();
        assert!(e.contains("no image files"), "{e}");
    }

    #[test]
    fn a_vanished_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        image::GrayImage::new(2, 2).save(dir.path().join("a.png")).unwrap();
        let mut source = ReplaySource::open("cam", dir.path().to_str().unwrap(), 1 << 20).unwrap();
        std::fs::remove_file(dir.path().join("a.png")).unwrap();
        assert!(matches!(source.next_frame(), Err(CaptureError::Read { .. })));
    }

    /// The drill for unbounded frames (issue 23): a 67-byte PNG that declares 20000×20000
    /// (400 MP; decoding it took 12.8 GB) is refused from its header, and so is a real
    /// frame one pixel over the limit; frames within it still decode.
    #[test]
    fn a_frame_over_the_pixel_limit_is_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        image::GrayImage::new(64, 64).save(dir.path().join("a_fits.png")).unwrap();
        image::GrayImage::new(65, 64).save(dir.path().join("b_one_column_over.png")).unwrap();
        std::fs::write(dir.path().join("c_huge.png"), crate::image_files::png_header(20_000, 20_000)).unwrap();
        let mut source = ReplaySource::open("cam", dir.path().to_str().unwrap(), 64 * 64).unwrap();
        assert_eq!(source.next_frame().unwrap().width(), 64);
        let over = source.next_frame().err().unwrap();
        assert!(matches!(over, CaptureError::TooLarge { width: 65, height: 64, limit: 4096, .. }), "{over}");
        let huge = source.next_frame().err().unwrap();
        assert!(matches!(huge, CaptureError::TooLarge { width: 20_000, height: 20_000, .. }), "{huge}");
        assert!(huge.to_string().contains("c_huge.png") && huge.to_string().contains("20000x20000"), "{huge}");
    }
}

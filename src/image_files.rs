//! Finding image files on disk: the extensions the project reads and a sorted listing.
//!
//! Shared by `retrain`'s data layouts, `eval`'s datasets and the daemon's replay source so
//! that "an image" means the same file set everywhere. Ground-truth masks (`*_mask.*`) are
//! never images to inspect or train on.

use std::path::{Path, PathBuf};

pub const EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// Whether `path` names an image the project reads (and not a `*_mask` file).
pub fn is_image(path: &Path) -> bool {
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    EXTENSIONS.contains(&ext.as_str()) && !stem.ends_with("_mask")
}

/// Image files in `dir` (and below it when `recursive`), sorted; the error names the
/// directory that could not be read.
pub fn list_images(dir: &Path, recursive: bool) -> Result<Vec<PathBuf>, (PathBuf, std::io::Error)> {
    let mut out = Vec::new();
    collect(dir, recursive, &mut out)?;
    out.sort();
    Ok(out)
}

fn collect(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> Result<(), (PathBuf, std::io::Error)> {
    let entries = std::fs::read_dir(dir).map_err(|e| (dir.to_path_buf(), e))?;
    for entry in entries {
        let path = entry.map_err(|e| (dir.to_path_buf(), e))?.path();
        if path.is_dir() {
            if recursive {
                collect(&path, true, out)?;
            }
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}

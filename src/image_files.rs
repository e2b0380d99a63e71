//! Image files on disk: the extensions the project reads, a sorted listing, and decoding
//! within a pixel limit.
//!
//! Shared by `retrain`'s data layouts, `eval`'s datasets, `infer` and the daemon's replay
//! source so that "an image" means the same file set everywhere, and no file can make any of
//! them allocate without bound (a 389 KB PNG may declare 20000×20000). Ground-truth masks
//! (`*_mask.*`) are never images to inspect or train on.

use std::io::{BufRead, Seek};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader};

/// Files with more pixels are not decoded by `infer`, `eval` and `retrain` (32 MP: a 5 MP
/// line camera six times over); the daemon's cameras have their own `max_frame_pixels`.
pub const MAX_FILE_PIXELS: u64 = 32_000_000;

/// Why an image was not decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{width}x{height} is over the limit of {limit} pixels; not decoded")]
    TooLarge { width: u32, height: u32, limit: u64 },
    #[error(transparent)]
    Image(#[from] image::ImageError),
}

/// Decodes an encoded image, refusing from its header alone one with more than
/// `max_pixels` pixels, with the decoder's allocation limit behind that.
pub fn decode_within(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, DecodeError> {
    let reader =
        || ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(image::ImageError::IoError);
    decode_bounded(reader, max_pixels)
}

/// Reads and decodes `path` as [`decode_within`] does.
pub fn open_within(path: &Path, max_pixels: u64) -> Result<DynamicImage, DecodeError> {
    let reader =
        || ImageReader::open(path).and_then(ImageReader::with_guessed_format).map_err(image::ImageError::IoError);
    decode_bounded(reader, max_pixels)
}

/// The header's size first (a fresh reader: reading it consumes one), then the decode.
fn decode_bounded<R: BufRead + Seek>(
    reader: impl Fn() -> Result<ImageReader<R>, image::ImageError>,
    max_pixels: u64,
) -> Result<DynamicImage, DecodeError> {
    let (width, height) = reader()?.into_dimensions()?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(DecodeError::TooLarge { width, height, limit: max_pixels });
    }
    let mut limits = image::Limits::default();
    // 16-bit RGBA is the widest layout a decoder allocates.
    limits.max_alloc = Some(max_pixels.saturating_mul(8));
    let mut reader = reader()?;
    reader.limits(limits);
    Ok(reader.decode()?)
}

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

/// A PNG signature, an IHDR chunk (8-bit grey) for `width`×`height`, an empty IDAT and the
/// end: a file that declares a size and has no pixel data (for the decoding drills, the
/// daemon's included).
#[doc(hidden)]
pub fn png_header(width: u32, height: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let body = [kind, data].concat();
        [&(data.len() as u32).to_be_bytes()[..], &body, &crc32fast::hash(&body).to_be_bytes()].concat()
    };
    let ihdr = [&width.to_be_bytes()[..], &height.to_be_bytes(), &[8, 0, 0, 0, 0]].concat();
    [&b"\x89PNG\r\n\x1a\n"[..], &chunk(b"IHDR", &ihdr), &chunk(b"IDAT", &[]), &chunk(b"IEND", &[])].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drill for `infer`, `eval` and `retrain` (issue 23): a file that declares
    /// 20000×20000 is refused from its header; a file within the limit decodes.
    #[test]
    fn a_file_over_the_pixel_limit_is_not_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let (huge, small) = (dir.path().join("huge.png"), dir.path().join("small.png"));
        std::fs::write(&huge, png_header(20_000, 20_000)).unwrap();
        image::GrayImage::new(40, 30).save(&small).unwrap();
        let refused = open_within(&huge, MAX_FILE_PIXELS).err().unwrap();
        assert!(matches!(refused, DecodeError::TooLarge { width: 20_000, height: 20_000, .. }), "{refused}");
        assert_eq!(open_within(&small, 1200).unwrap().width(), 40);
        assert!(matches!(open_within(&small, 1199), Err(DecodeError::TooLarge { .. })));
    }
}

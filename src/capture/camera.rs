//! V4L2 cameras through nokhwa.
//!
//! Opening asks for the closest format to the configured resolution, frame rate and pixel
//! format; each raw buffer (MJPEG, YUYV, NV12, grey, RGB) is decoded by nokhwa's decoders
//! into RGB. Decoding is a separate function so that it is tested without a camera, which
//! CI machines do not have.

use image::{DynamicImage, RgbImage};
use nokhwa::Camera;
use nokhwa::pixel_format::RgbFormat;
use nokhwa::utils::{CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType, Resolution};
use serde::{Deserialize, Serialize};

use super::{CaptureError, FrameSource};

/// Pixel format asked of the camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    Mjpeg,
    Yuyv,
    Nv12,
    Gray,
    Rgb,
}

impl From<PixelFormat> for FrameFormat {
    fn from(p: PixelFormat) -> Self {
        match p {
            PixelFormat::Mjpeg => FrameFormat::MJPEG,
            PixelFormat::Yuyv => FrameFormat::YUYV,
            PixelFormat::Nv12 => FrameFormat::NV12,
            PixelFormat::Gray => FrameFormat::GRAY,
            PixelFormat::Rgb => FrameFormat::RAWRGB,
        }
    }
}

/// What to open: a device index (`"0"`) or path (`"/dev/video2"`), and the format wanted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraSettings {
    pub device: String,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub pixel_format: PixelFormat,
}

/// Decodes one raw camera buffer into RGB.
pub fn decode(
    camera: &str,
    format: FrameFormat,
    width: u32,
    height: u32,
    bytes: &[u8],
) -> Result<RgbImage, CaptureError> {
    let decode_error = |reason: String| CaptureError::Decode {
        camera: camera.to_string(),
        format: format.to_string(),
        width,
        height,
        bytes: bytes.len(),
        reason,
    };
    // nokhwa's converters index the buffer by the resolution: check the size first so a
    // truncated frame is an error, not a panic.
    let pixels = width as usize * height as usize;
    let expected = match format {
        FrameFormat::YUYV => Some(pixels * 2),
        FrameFormat::NV12 => Some(pixels * 3 / 2),
        FrameFormat::GRAY => Some(pixels),
        FrameFormat::RAWRGB | FrameFormat::RAWBGR => Some(pixels * 3),
        FrameFormat::MJPEG => None,
    };
    if let Some(expected) = expected
        && bytes.len() < expected
    {
        return Err(decode_error(format!("expected {expected} bytes")));
    }
    let buffer = nokhwa::Buffer::new(Resolution::new(width, height), bytes, format);
    // mozjpeg (nokhwa's MJPEG decoder) reports a corrupt stream by panicking; one bad
    // frame from a camera must be counted and skipped, not take the capture thread down.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| buffer.decode_image::<RgbFormat>())) {
        Ok(decoded) => decoded.map_err(|e| decode_error(e.to_string())),
        Err(_) => Err(decode_error("the decoder rejected the data".into())),
    }
}

/// nokhwa's V4L2 backend opens devices by index: `"/dev/video2"` and `"2"` are index 2;
/// anything else (a `/dev/v4l/by-id/…` link, say) is resolved to its `/dev/videoN` target.
fn camera_index(device: &str) -> CameraIndex {
    let resolved = std::fs::canonicalize(device).map(|p| p.display().to_string()).unwrap_or_else(|_| device.into());
    let number = resolved.strip_prefix("/dev/video").unwrap_or(&resolved);
    match number.parse::<u32>() {
        Ok(n) => CameraIndex::Index(n),
        Err(_) => CameraIndex::String(device.to_string()),
    }
}

/// An open, streaming camera.
pub struct CameraSource {
    id: String,
    camera: Camera,
}

impl CameraSource {
    pub fn open(id: &str, settings: &CameraSettings) -> Result<Self, CaptureError> {
        let index = camera_index(&settings.device);
        let wanted = CameraFormat::new(
            Resolution::new(settings.width, settings.height),
            settings.pixel_format.into(),
            settings.fps,
        );
        let open_error =
            |reason: String| CaptureError::Open { camera: id.to_string(), device: settings.device.clone(), reason };
        let mut camera = Camera::new(index, RequestedFormat::new::<RgbFormat>(RequestedFormatType::Closest(wanted)))
            .map_err(|e| open_error(e.to_string()))?;
        camera.open_stream().map_err(|e| open_error(e.to_string()))?;
        tracing::info!(camera = id, device = %settings.device, format = ?camera.camera_format(), "Camera opened.");
        Ok(Self { id: id.to_string(), camera })
    }
}

impl FrameSource for CameraSource {
    fn camera(&self) -> &str {
        &self.id
    }

    fn next_frame(&mut self) -> Result<DynamicImage, CaptureError> {
        let buffer =
            self.camera.frame().map_err(|e| CaptureError::Read { camera: self.id.clone(), reason: e.to_string() })?;
        let resolution = buffer.resolution();
        decode(&self.id, buffer.source_frame_format(), resolution.width_x, resolution.height_y, buffer.buffer())
            .map(DynamicImage::ImageRgb8)
    }
}

impl Drop for CameraSource {
    fn drop(&mut self) {
        if let Err(e) = self.camera.stop_stream() {
            tracing::warn!(camera = %self.id, error = %e, "Camera stream did not stop cleanly.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuyv_grey_decodes_to_grey() {
        // Y = 128, U = V = 128 (no chroma): every pixel mid-grey.
        let img = decode("cam", FrameFormat::YUYV, 4, 2, &[128u8; 16]).unwrap();
        assert_eq!(img.dimensions(), (4, 2));
        for p in img.pixels() {
            assert!(p.0.iter().all(|c| (*c as i32 - 128).abs() <= 2), "{p:?}");
        }
    }

    #[test]
    fn mjpeg_round_trips_through_nokhwa() {
        let frame = RgbImage::from_fn(32, 16, |x, y| image::Rgb([(x * 8) as u8, (y * 16) as u8, 90]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95).encode_image(&frame).unwrap();
        let decoded = decode("cam", FrameFormat::MJPEG, 32, 16, &jpeg).unwrap();
        let total: f64 = frame.as_raw().iter().zip(decoded.as_raw()).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum();
        let mae = total / frame.as_raw().len() as f64;
        assert!(mae < 3.0, "mean abs error {mae}");
    }

    #[test]
    fn truncated_and_corrupt_frames_are_errors() {
        let e = decode("line-2", FrameFormat::YUYV, 64, 48, &[0u8; 100]).unwrap_err();
        assert!(e.to_string().contains("line-2") && e.to_string().contains("expected 6144 bytes"), "{e}");
        assert!(decode("line-2", FrameFormat::MJPEG, 64, 48, b"not a jpeg").is_err());
    }

    #[test]
    fn device_paths_and_indices_name_the_same_camera() {
        assert_eq!(camera_index("0"), CameraIndex::Index(0));
        assert_eq!(camera_index("/dev/video0"), CameraIndex::Index(0));
        assert_eq!(camera_index("/dev/video12"), CameraIndex::Index(12));
        // A link is followed to the device it names.
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("by-id-cam");
        std::os::unix::fs::symlink("/dev/video3", &link).unwrap();
        let resolved = camera_index(link.to_str().unwrap());
        // canonicalize needs the target to exist; without /dev/video3 the path is kept as is.
        if std::path::Path::new("/dev/video3").exists() {
            assert_eq!(resolved, CameraIndex::Index(3));
        } else {
            assert_eq!(resolved, CameraIndex::String(link.display().to_string()));
        }
        assert_eq!(camera_index("/dev/video-x"), CameraIndex::String("/dev/video-x".into()));
    }

    #[test]
    fn a_missing_device_is_an_error_not_a_panic() {
        let settings = CameraSettings {
            device: "/dev/video-does-not-exist".into(),
            width: 640,
            height: 480,
            fps: 30,
            pixel_format: PixelFormat::Mjpeg,
        };
        let e = CameraSource::open("cam0", &settings).err().expect("no such camera");
        assert!(e.to_string().contains("cam0") && e.to_string().contains("/dev/video-does-not-exist"), "{e}");
    }
}

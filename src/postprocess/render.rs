//! Encoders for what people look at: mask PNGs, heat-map overlays, raw map PNGs.

use std::io::Cursor;

use image::{ImageFormat, Luma, Rgb, RgbImage};

use super::anomaly::Analysis;

/// Output format of an overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayFormat {
    Png,
    Jpeg { quality: u8 },
}

/// Binary mask as an 8-bit PNG (0 / 255) at the analysis' resolution.
pub fn mask_png(analysis: &Analysis) -> Vec<u8> {
    encode_png(mask_image(analysis))
}

/// [`mask_png`] no wider than `max_width` (scaled down, nearest neighbour keeps it binary);
/// returns the PNG and its `[width, height]`.
pub fn mask_png_within(analysis: &Analysis, max_width: u32) -> (Vec<u8>, [usize; 2]) {
    let img = fit_width(mask_image(analysis), max_width, image::imageops::FilterType::Nearest);
    let size = [img.width() as usize, img.height() as usize];
    (encode_png(img), size)
}

fn mask_image(analysis: &Analysis) -> image::GrayImage {
    image::GrayImage::from_fn(analysis.width as u32, analysis.height as u32, |x, y| {
        Luma([analysis.mask[y as usize * analysis.width + x as usize] * 255])
    })
}

/// `img` scaled down to `max_width` (aspect kept) if it is wider.
fn fit_width<P: image::Pixel<Subpixel = u8> + 'static>(
    img: image::ImageBuffer<P, Vec<u8>>,
    max_width: u32,
    filter: image::imageops::FilterType,
) -> image::ImageBuffer<P, Vec<u8>> {
    if img.width() <= max_width {
        return img;
    }
    let height = ((img.height() as u64 * max_width as u64) / img.width() as u64).max(1) as u32;
    image::imageops::resize(&img, max_width, height, filter)
}

/// Normalised pixel scores as a 16-bit greyscale PNG (0.5 = threshold = 32768).
pub fn map_png(analysis: &Analysis) -> Vec<u8> {
    let img =
        image::ImageBuffer::<Luma<u16>, Vec<u16>>::from_fn(analysis.width as u32, analysis.height as u32, |x, y| {
            let v = analysis.normalised_map[y as usize * analysis.width + x as usize];
            Luma([(v.clamp(0.0, 1.0) * 65535.0).round() as u16])
        });
    encode_png(img)
}

fn encode_png(img: impl Into<image::DynamicImage>) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.into().write_to(&mut out, ImageFormat::Png).expect("PNG encoding into memory cannot fail");
    out.into_inner()
}

/// The "jet" colormap (as in anomalib's overlays) for a value in [0, 1].
fn jet(v: f32) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    let channel = |offset: f32| ((1.5 - (4.0 * v - offset).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// Frame with the colour-mapped normalised scores blended in, the predicted mask's outline
/// in red and, when given (`eval`), the ground-truth mask's outline in white.
pub fn overlay(frame: &RgbImage, analysis: &Analysis, truth: Option<&[u8]>, format: OverlayFormat) -> Vec<u8> {
    encode_overlay(&overlay_image(frame, analysis, truth), format)
}

/// [`overlay`] no wider than `max_width` (MQTT snapshots, `eval` overlays of large frames).
pub fn overlay_within(
    frame: &RgbImage,
    analysis: &Analysis,
    truth: Option<&[u8]>,
    format: OverlayFormat,
    max_width: u32,
) -> Vec<u8> {
    let img = fit_width(overlay_image(frame, analysis, truth), max_width, image::imageops::FilterType::Triangle);
    encode_overlay(&img, format)
}

fn overlay_image(frame: &RgbImage, analysis: &Analysis, truth: Option<&[u8]>) -> RgbImage {
    const ALPHA: f32 = 0.4;
    let (w, h) = (analysis.width, analysis.height);
    let mut img = RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let p = frame.get_pixel(x, y).0;
        let c = jet(analysis.normalised_map[y as usize * w + x as usize]);
        Rgb(std::array::from_fn(|i| ((1.0 - ALPHA) * p[i] as f32 + ALPHA * c[i] as f32).round() as u8))
    });
    let mut outline = |mask: &[u8], colour: Rgb<u8>| {
        let inside = |x: isize, y: isize| {
            x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h && mask[y as usize * w + x as usize] != 0
        };
        for y in 0..h as isize {
            for x in 0..w as isize {
                let edge =
                    inside(x, y) && [(-1, 0), (1, 0), (0, -1), (0, 1)].iter().any(|(dx, dy)| !inside(x + dx, y + dy));
                if edge {
                    img.put_pixel(x as u32, y as u32, colour);
                }
            }
        }
    };
    if let Some(truth) = truth {
        outline(truth, Rgb([255, 255, 255]));
    }
    outline(&analysis.mask, Rgb([255, 0, 0]));
    img
}

fn encode_overlay(img: &RgbImage, format: OverlayFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    match format {
        OverlayFormat::Png => img.write_to(&mut out, ImageFormat::Png).expect("PNG encoding into memory cannot fail"),
        OverlayFormat::Jpeg { quality } => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
                .encode_image(img)
                .expect("JPEG encoding into memory cannot fail");
        }
    }
    out.into_inner()
}

//! The project's benchmark: seeded datasets in the MVTec layout cut from a real texture
//! photograph, with synthetic defects painted at model resolution and exact masks.
//!
//! Normal crops for `train/` come from the left part of the photograph and crops for `test/`
//! from a held-out strip on the right, so no test image repeats a training crop. Defects
//! are painted with hard edges: the mask is exactly the set of pixels the defect touched.
//! Contamination mixes freshly generated defective images (never reused in `test/`) into
//! `train/good`; `synth.json` lists them, for analysis only — training never reads it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, imageops};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// How the contamination ratio is defined, stated in every dataset it shapes.
pub const CONTAMINATION_DEFINITION: &str =
    "contamination p = defective / (normal + defective) images in train/good; round(p * train) images are defective";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DefectKind {
    Scratch,
    Hole,
    Stain,
    Crack,
    Foreign,
    /// Texture lost inside an irregular blob (worn, polished or smeared surface): the
    /// texture there is blurred to its local mean, brightness unchanged.
    Wear,
    /// A dent: the texture inside a disc pulled toward (or pushed from) its centre, with the
    /// faint shading of a tilted surface.
    Dent,
}

impl DefectKind {
    pub const ALL: [DefectKind; 5] = [Self::Scratch, Self::Hole, Self::Stain, Self::Crack, Self::Foreign];
    /// Families only `synth --held-out-families` draws, into the test set alone: neither the
    /// training contamination, nor `retrain`'s search and head, nor any choice of this
    /// project's parameters ever saw them.
    pub const HELD_OUT: [DefectKind; 2] = [Self::Wear, Self::Dent];

    pub fn name(self) -> &'static str {
        match self {
            Self::Scratch => "scratch",
            Self::Hole => "hole",
            Self::Stain => "stain",
            Self::Crack => "crack",
            Self::Foreign => "foreign",
            Self::Wear => "wear",
            Self::Dent => "dent",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub size: u32,
    pub crop: u32,
    pub train: usize,
    pub test_good: usize,
    pub test_per_type: usize,
    pub contamination: f64,
    pub seed: u64,
    /// Draw defects as for an image of this side (e.g. 64 in 256-pixel native crops:
    /// defects of 3–20 px); `None`: as for the image itself.
    pub defect_extent: Option<u32>,
    /// Add the [`DefectKind::HELD_OUT`] families to the test set.
    pub held_out_families: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{path}: cannot read texture: {reason}")]
    Texture { path: PathBuf, reason: String },
    #[error(
        "{path}: texture is {width}x{height}; it must be at least {need} wide (--crop plus a held-out test \
         strip), at least --crop high, and --size must not exceed --crop"
    )]
    TextureTooSmall { path: PathBuf, width: u32, height: u32, need: u32 },
    #[error("--contamination must be in [0, 1), got {0}")]
    Contamination(f64),
    #[error("--{name} must be at least {min}, got {value}")]
    TooFew { name: &'static str, min: usize, value: usize },
    #[error("{path}: already exists (use --force to replace it)")]
    Exists { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// One generated defective image, as recorded in `synth.json`.
#[derive(Debug, Clone, Serialize)]
pub struct DefectRecord {
    pub file: String,
    pub kind: DefectKind,
    /// Scale factor of the defect: 0.6 small, 1.0 medium, 1.6 large.
    pub scale: f64,
    /// Intensity change relative to the texture: "low" or "high".
    pub contrast: &'static str,
    pub area: usize,
}

#[derive(Debug, Serialize)]
pub struct SynthSummary {
    pub texture: String,
    pub texture_sha256: String,
    pub foreign_texture: Option<String>,
    pub seed: u64,
    pub size: u32,
    pub crop: u32,
    pub contamination: f64,
    pub contamination_definition: &'static str,
    pub train_normal: usize,
    pub train_defective: usize,
    pub test_good: usize,
    pub test_per_type: usize,
    /// The defect types of the test set, in order.
    pub test_types: Vec<&'static str>,
    /// The defective images hidden in train/good (for analysis; never given to training).
    pub contaminated_train: Vec<DefectRecord>,
    pub test_defects: Vec<DefectRecord>,
}

fn read_texture(path: &Path) -> Result<(GrayImage, String), SynthError> {
    let bytes = std::fs::read(path).map_err(|e| SynthError::Texture { path: path.into(), reason: e.to_string() })?;
    let image = image::load_from_memory(&bytes)
        .map_err(|e| SynthError::Texture { path: path.into(), reason: e.to_string() })?
        .to_luma8();
    Ok((image, crate::infer::bundle::sha256_hex(&bytes)))
}

/// Where crops may start: train crops from the left, test crops from the right strip.
struct CropArea {
    x: std::ops::RangeInclusive<u32>,
    y: std::ops::RangeInclusive<u32>,
}

fn crop(texture: &GrayImage, area: &CropArea, config: &SynthConfig, rng: &mut ChaCha8Rng) -> GrayImage {
    let (x0, y0) = (rng.random_range(area.x.clone()), rng.random_range(area.y.clone()));
    let mut img = imageops::crop_imm(texture, x0, y0, config.crop, config.crop).to_image();
    if rng.random_bool(0.5) {
        img = imageops::flip_vertical(&img);
    }
    imageops::resize(&img, config.size, config.size, imageops::FilterType::Triangle)
}

fn shift(v: u8, delta: f64) -> u8 {
    (v as f64 + delta).round().clamp(0.0, 255.0) as u8
}

/// Distance from `p` to the segment `a`–`b`.
pub(crate) fn segment_distance(p: (f64, f64), a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = (dx * dx + dy * dy).max(1e-12);
    let t = (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0);
    ((p.0 - a.0 - t * dx).powi(2) + (p.1 - a.1 - t * dy).powi(2)).sqrt()
}

/// Paints one defect of `kind` (any but foreign texture, which needs a second photograph) at
/// a random scale and contrast onto `img`; returns the exact mask (0/255). `retrain` paints
/// scratches, holes and stains with it (`train::defects`); cracks are never among them.
pub fn paste_defect(img: &mut GrayImage, kind: DefectKind, rng: &mut ChaCha8Rng) -> GrayImage {
    assert!(kind != DefectKind::Foreign, "paste_defect: foreign patches need a texture");
    let scale = [0.6, 1.0, 1.6][rng.random_range(0..3)];
    let high_contrast = rng.random_bool(0.5);
    let extent = img.width() as f64;
    paint(img, extent, kind, scale, high_contrast, &GrayImage::new(1, 1), rng)
}

/// Replaces an irregular blob of `img` with texture from `donor` (another frame of the same
/// surface) turned by a multiple of 90°, flipped or not, and resampled at half or twice its
/// scale: texture that belongs to the surface but not at that place, size or orientation.
/// This is DRAEM's anomaly source (any texture inside a random mask) drawn from the field's
/// own frames, so no other photograph is involved and benchmark "foreign" patches (another
/// texture photograph in an ellipse) stay a shape nothing was trained on. Low-contrast
/// transplants are shifted to the surface's mean under the blob. Returns the mask (0/255).
pub fn paste_transplant(img: &mut GrayImage, donor: &GrayImage, rng: &mut ChaCha8Rng) -> GrayImage {
    let (width, height) = img.dimensions();
    let extent = width.min(height) as f64;
    let scale = [0.6, 1.0, 1.6][rng.random_range(0..3)];
    let centre = (rng.random_range(0.25..0.75) * width as f64, rng.random_range(0.25..0.75) * height as f64);
    let blobs: Vec<((f64, f64), f64)> = (0..rng.random_range(3..6))
        .map(|_| {
            let r = (rng.random_range(0.05..0.1) * extent * scale).max(1.5);
            ((centre.0 + rng.random_range(-1.0..1.0) * r, centre.1 + rng.random_range(-1.0..1.0) * r), r)
        })
        .collect();
    let mut mask = GrayImage::new(width, height);
    for (x, y, m) in mask.enumerate_pixels_mut() {
        let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
        if blobs.iter().any(|(c, r)| (px - c.0).powi(2) + (py - c.1).powi(2) <= r * r) {
            *m = Luma([255]);
        }
    }
    let zoom = if rng.random_bool(0.5) { 0.5 } else { 2.0 };
    let (turns, flip) = (rng.random_range(0..4u32), rng.random_bool(0.5));
    let offset = (rng.random_range(0..donor.width()), rng.random_range(0..donor.height()));
    let source = |x: u32, y: u32| {
        let (u, v) = if flip { (width - 1 - x, y) } else { (x, y) };
        let (u, v) = match turns {
            0 => (u, v),
            1 => (v, width - 1 - u),
            2 => (width - 1 - u, height - 1 - v),
            _ => (height - 1 - v, u),
        };
        let sx = ((u as f64 * zoom) as u32 + offset.0) % donor.width();
        let sy = ((v as f64 * zoom) as u32 + offset.1) % donor.height();
        donor.get_pixel(sx, sy).0[0] as f64
    };
    let inside: Vec<(u32, u32)> =
        mask.enumerate_pixels().filter(|(_, _, m)| m.0[0] != 0).map(|(x, y, _)| (x, y)).collect();
    let mean =
        |f: &dyn Fn(u32, u32) -> f64| inside.iter().map(|&(x, y)| f(x, y)).sum::<f64>() / inside.len().max(1) as f64;
    let offset_level =
        if rng.random_bool(0.5) { 0.0 } else { mean(&|x, y| img.get_pixel(x, y).0[0] as f64) - mean(&source) };
    for &(x, y) in &inside {
        img.put_pixel(x, y, Luma([shift(0, source(x, y) + offset_level)]));
    }
    mask
}

/// Paints one defect of `kind` onto `img`; returns the exact mask (0/255).
fn paint(
    img: &mut GrayImage,
    extent: f64,
    kind: DefectKind,
    scale: f64,
    high_contrast: bool,
    foreign: &GrayImage,
    rng: &mut ChaCha8Rng,
) -> GrayImage {
    let size = img.width() as f64;
    // Defect geometry is drawn for an image of side `extent`: the image itself for
    // thumbnails, a fixed 64 for native-resolution frames (small defects, 3–20 px).
    let extent = extent.min(size);
    let mut mask = GrayImage::new(img.width(), img.height());
    let strength = if high_contrast { 0.45 } else { 0.22 } * 255.0;
    let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
    let centre = (rng.random_range(0.25..0.75) * size, rng.random_range(0.25..0.75) * size);
    let surface_mean = img.pixels().map(|p| p.0[0] as f64).sum::<f64>() / (size * size);
    let source = img.clone();
    // `inside(x, y)` decides the support; `value(x, y, v)` the new pixel there.
    let mut apply = |inside: &dyn Fn(f64, f64) -> bool, value: &mut dyn FnMut(u32, u32, u8) -> u8| {
        for y in 0..img.height() {
            for x in 0..img.width() {
                if inside(x as f64 + 0.5, y as f64 + 0.5) {
                    let v = img.get_pixel(x, y).0[0];
                    img.put_pixel(x, y, Luma([value(x, y, v)]));
                    mask.put_pixel(x, y, Luma([255]));
                }
            }
        }
    };
    match kind {
        DefectKind::Scratch => {
            let angle = rng.random_range(0.0..std::f64::consts::PI);
            let half = rng.random_range(0.15..0.3) * extent * scale;
            let (dx, dy) = (angle.cos() * half, angle.sin() * half);
            let (a, b) = ((centre.0 - dx, centre.1 - dy), (centre.0 + dx, centre.1 + dy));
            let width = if scale > 1.2 { 1.6 } else { 1.0 };
            apply(&|x, y| segment_distance((x, y), a, b) <= width / 2.0 + 0.25, &mut |_, _, v| {
                shift(v, sign * strength)
            });
        }
        DefectKind::Hole => {
            let (rx, ry) =
                (rng.random_range(0.04..0.08) * extent * scale, rng.random_range(0.04..0.08) * extent * scale);
            let (rx, ry) = (rx.max(1.5), ry.max(1.5));
            let depth = if high_contrast { 0.2 } else { 0.55 };
            apply(&|x, y| ((x - centre.0) / rx).powi(2) + ((y - centre.1) / ry).powi(2) <= 1.0, &mut |_, _, v| {
                (v as f64 * depth).round() as u8
            });
        }
        DefectKind::Stain => {
            let blobs = blob_cluster(rng, centre, (0.04, 0.08), extent * scale, 1.5);
            let inside = |x: f64, y: f64| in_blobs(&blobs, x, y);
            // A soft profile inside a hard support: strongest at the centre, never zero.
            let reach = blobs.iter().map(|(c, r)| ((c.0 - centre.0).hypot(c.1 - centre.1)) + r).fold(1.0, f64::max);
            apply(&inside, &mut |x, y, v| {
                let d = (x as f64 + 0.5 - centre.0).hypot(y as f64 + 0.5 - centre.1) / reach;
                shift(v, sign * strength * (1.0 - 0.5 * d.min(1.0)))
            });
        }
        DefectKind::Crack => {
            let mut points = vec![centre];
            let mut angle = rng.random_range(0.0..std::f64::consts::TAU);
            for _ in 0..(rng.random_range(6..12) as f64 * scale).round() as usize {
                angle += rng.random_range(-0.7..0.7);
                let step = rng.random_range(2.0..4.0);
                let last = *points.last().expect("starts with the centre");
                let next = (
                    (last.0 + angle.cos() * step).clamp(1.0, size - 1.0),
                    (last.1 + angle.sin() * step).clamp(1.0, size - 1.0),
                );
                points.push(next);
            }
            apply(&|x, y| points.windows(2).any(|s| segment_distance((x, y), s[0], s[1]) <= 0.75), &mut |_, _, v| {
                shift(v, -strength * 1.2)
            });
        }
        DefectKind::Foreign => {
            let (rx, ry) =
                (rng.random_range(0.08..0.15) * extent * scale, rng.random_range(0.08..0.15) * extent * scale);
            let (fx, fy) = (
                rng.random_range(0..foreign.width() - size as u32),
                rng.random_range(0..foreign.height() - size as u32),
            );
            // Low contrast: the patch is matched to the surface's mean brightness.
            let patch_mean = (0..size as u32)
                .flat_map(|y| (0..size as u32).map(move |x| (x, y)))
                .map(|(x, y)| foreign.get_pixel(fx + x, fy + y).0[0] as f64)
                .sum::<f64>()
                / (size * size);
            let offset = if high_contrast { 0.0 } else { surface_mean - patch_mean };
            apply(&|x, y| ((x - centre.0) / rx).powi(2) + ((y - centre.1) / ry).powi(2) <= 1.0, &mut |x, y, _| {
                shift(foreign.get_pixel(fx + x, fy + y).0[0], offset)
            });
        }
        DefectKind::Wear => {
            let blobs = blob_cluster(rng, centre, (0.05, 0.1), extent * scale, 2.0);
            let inside = |x: f64, y: f64| in_blobs(&blobs, x, y);
            let radius = (0.05 * extent).max(2.0) as i64;
            let keep = if high_contrast { 0.0 } else { 0.4 };
            apply(&inside, &mut |x, y, v| {
                let local = box_mean(&source, x as i64, y as i64, radius);
                (keep * v as f64 + (1.0 - keep) * local).round().clamp(0.0, 255.0) as u8
            });
        }
        DefectKind::Dent => {
            let r = (rng.random_range(0.08..0.14) * extent * scale).max(3.0);
            let pull = if high_contrast { 0.45 } else { 0.25 } * sign;
            let light = rng.random_range(0.0..std::f64::consts::TAU);
            let shade = strength * 0.6;
            apply(&|x, y| (x - centre.0).hypot(y - centre.1) <= r, &mut |x, y, _| {
                let (dx, dy) = (x as f64 + 0.5 - centre.0, y as f64 + 0.5 - centre.1);
                let falloff = 1.0 - (dx * dx + dy * dy) / (r * r);
                let (sx, sy) = (centre.0 + dx * (1.0 + pull * falloff), centre.1 + dy * (1.0 + pull * falloff));
                let v = sample(&source, sx - 0.5, sy - 0.5);
                // The dent's wall facing the light is brighter, the far one darker.
                let facing = (dx * light.cos() + dy * light.sin()) / r;
                shift(v.round().clamp(0.0, 255.0) as u8, shade * facing * falloff.sqrt())
            });
        }
    }
    mask
}

/// 3–5 discs of radius `fraction × extent` (at least `min`) scattered around `centre`,
/// each within its own radius of it: an irregular blob.
fn blob_cluster(
    rng: &mut ChaCha8Rng,
    centre: (f64, f64),
    fraction: (f64, f64),
    extent: f64,
    min: f64,
) -> Vec<((f64, f64), f64)> {
    (0..rng.random_range(3..6))
        .map(|_| {
            let r = rng.random_range(fraction.0..fraction.1) * extent;
            let offset = (rng.random_range(-1.0..1.0) * r, rng.random_range(-1.0..1.0) * r);
            ((centre.0 + offset.0, centre.1 + offset.1), r.max(min))
        })
        .collect()
}

fn in_blobs(blobs: &[((f64, f64), f64)], x: f64, y: f64) -> bool {
    blobs.iter().any(|(c, r)| (x - c.0).powi(2) + (y - c.1).powi(2) <= r * r)
}

/// Mean of `img` over the square of `radius` around `(x, y)`, clipped to the image.
fn box_mean(img: &GrayImage, x: i64, y: i64, radius: i64) -> f64 {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (mut sum, mut n) = (0.0, 0.0);
    for yy in (y - radius).max(0)..=(y + radius).min(h - 1) {
        for xx in (x - radius).max(0)..=(x + radius).min(w - 1) {
            sum += img.get_pixel(xx as u32, yy as u32).0[0] as f64;
            n += 1.0;
        }
    }
    sum / n
}

/// Bilinear sample of `img` at pixel coordinates `(x, y)`, clamped to the image.
pub(crate) fn sample(img: &GrayImage, x: f64, y: f64) -> f64 {
    let (w, h) = (img.width() as f64 - 1.0, img.height() as f64 - 1.0);
    let (x, y) = (x.clamp(0.0, w), y.clamp(0.0, h));
    let (x0, y0) = (x.floor(), y.floor());
    let (x1, y1) = ((x0 + 1.0).min(w), (y0 + 1.0).min(h));
    let (fx, fy) = (x - x0, y - y0);
    let at = |a: f64, b: f64| img.get_pixel(a as u32, b as u32).0[0] as f64;
    (at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx) * (1.0 - fy) + (at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx) * fy
}

fn save(path: &Path, img: &GrayImage) -> Result<(), SynthError> {
    img.save(path).map_err(|e| SynthError::Io { path: path.into(), source: std::io::Error::other(e) })
}

fn defect_image(
    texture: &GrayImage,
    area: &CropArea,
    foreign: &GrayImage,
    config: &SynthConfig,
    kind: DefectKind,
    rng: &mut ChaCha8Rng,
) -> (GrayImage, GrayImage, f64, bool) {
    let scale = [0.6, 1.0, 1.6][rng.random_range(0..3)];
    let high_contrast = rng.random_bool(0.5);
    let mut img = crop(texture, area, config, rng);
    let extent = config.defect_extent.map_or(config.size, |e| e.min(config.size)) as f64;
    let mask = paint(&mut img, extent, kind, scale, high_contrast, foreign, rng);
    (img, mask, scale, high_contrast)
}

/// `0..len` in a Fisher–Yates order drawn from `rng`. Written out rather than rand's
/// `SliceRandom::shuffle`, which draws its indices differently: every `synth` so far chose
/// its defective frames with this stream, and datasets stay byte-identical across versions.
pub fn shuffled(len: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    order
}

/// Which of the `train` training images are defective: the first `defective` of a shuffle
/// drawn from `rng`, so they are not all at the end of the listing.
pub fn contaminated_positions(rng: &mut ChaCha8Rng, train: usize, defective: usize) -> BTreeSet<usize> {
    shuffled(train, rng)[..defective].iter().copied().collect()
}

/// Writes the benchmark into `out` (through a temporary directory renamed at the end).
pub fn synthesise(
    texture_path: &Path,
    foreign_path: Option<&Path>,
    out: &Path,
    config: &SynthConfig,
    force: bool,
) -> Result<SynthSummary, SynthError> {
    if !(0.0..1.0).contains(&config.contamination) {
        return Err(SynthError::Contamination(config.contamination));
    }
    for (name, value) in
        [("train", config.train), ("test-good", config.test_good), ("test-per-type", config.test_per_type)]
    {
        if value == 0 {
            return Err(SynthError::TooFew { name, min: 1, value });
        }
    }
    if out.exists() && !force {
        return Err(SynthError::Exists { path: out.into() });
    }
    let (texture, texture_sha256) = read_texture(texture_path)?;
    let held_out = config.crop / 4;
    let need = config.crop + held_out + 1;
    if texture.width() < need || texture.height() < config.crop || config.size > config.crop {
        return Err(SynthError::TextureTooSmall {
            path: texture_path.into(),
            width: texture.width(),
            height: texture.height(),
            need,
        });
    }
    let foreign = match foreign_path {
        Some(p) => read_texture(p)?.0,
        None => imageops::rotate90(&texture),
    };
    let foreign = imageops::resize(
        &foreign,
        foreign.width() * config.size / config.crop,
        foreign.height() * config.size / config.crop,
        imageops::FilterType::Triangle,
    );
    let train_area =
        CropArea { x: 0..=texture.width() - config.crop - held_out - 1, y: 0..=texture.height() - config.crop };
    let test_area = CropArea {
        x: texture.width() - config.crop - held_out..=texture.width() - config.crop,
        y: train_area.y.clone(),
    };

    let staging = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    let _ = std::fs::remove_dir_all(&staging);
    let mut dirs = vec![staging.join("train/good"), staging.join("test/good")];
    let test_kinds: Vec<DefectKind> = DefectKind::ALL
        .into_iter()
        .chain(config.held_out_families.then_some(DefectKind::HELD_OUT).into_iter().flatten())
        .collect();
    for kind in &test_kinds {
        dirs.push(staging.join("test").join(kind.name()));
        dirs.push(staging.join("ground_truth").join(kind.name()));
    }
    for d in &dirs {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let defective = (config.contamination * config.train as f64).round() as usize;
    let contaminated = contaminated_positions(&mut rng, config.train, defective);
    let mut contaminated_train = Vec::new();
    for i in 0..config.train {
        let file = format!("train/good/{i:03}.png");
        let img = if contaminated.contains(&i) {
            let kind = DefectKind::ALL[rng.random_range(0..DefectKind::ALL.len())];
            let (img, mask, scale, high) = defect_image(&texture, &train_area, &foreign, config, kind, &mut rng);
            let area = mask.pixels().filter(|p| p.0[0] != 0).count();
            contaminated_train.push(DefectRecord { file: file.clone(), kind, scale, contrast: contrast(high), area });
            img
        } else {
            crop(&texture, &train_area, config, &mut rng)
        };
        save(&staging.join(&file), &img)?;
    }
    // The test set has its own stream: the same seed gives the same test set at every
    // contamination level, so levels are compared on identical images.
    let mut test_rng = ChaCha8Rng::seed_from_u64(config.seed);
    test_rng.set_stream(1);
    for i in 0..config.test_good {
        save(&staging.join(format!("test/good/{i:03}.png")), &crop(&texture, &test_area, config, &mut test_rng))?;
    }
    let mut test_defects = Vec::new();
    // Held-out families come after the others, so the first five types' images are the
    // same with and without them.
    for &kind in &test_kinds {
        for i in 0..config.test_per_type {
            let (img, mask, scale, high) = defect_image(&texture, &test_area, &foreign, config, kind, &mut test_rng);
            let file = format!("test/{}/{i:03}.png", kind.name());
            save(&staging.join(&file), &img)?;
            save(&staging.join(format!("ground_truth/{}/{i:03}_mask.png", kind.name())), &mask)?;
            let area = mask.pixels().filter(|p| p.0[0] != 0).count();
            test_defects.push(DefectRecord { file, kind, scale, contrast: contrast(high), area });
        }
    }
    let summary = SynthSummary {
        texture: texture_path.display().to_string(),
        texture_sha256,
        foreign_texture: foreign_path.map(|p| p.display().to_string()),
        seed: config.seed,
        size: config.size,
        crop: config.crop,
        contamination: config.contamination,
        contamination_definition: CONTAMINATION_DEFINITION,
        train_normal: config.train - defective,
        train_defective: defective,
        test_good: config.test_good,
        test_per_type: config.test_per_type,
        test_types: test_kinds.iter().map(|k| k.name()).collect(),
        contaminated_train,
        test_defects,
    };
    let json = serde_json::to_vec_pretty(&summary).expect("summary serialises");
    std::fs::write(staging.join("synth.json"), json).map_err(io(&staging.join("synth.json")))?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    }
    std::fs::rename(&staging, out).map_err(io(out))?;
    Ok(summary)
}

fn contrast(high: bool) -> &'static str {
    if high { "high" } else { "low" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texture() -> GrayImage {
        GrayImage::from_fn(96, 96, |x, y| Luma([(60 + (x * 7 + y * 13) % 120) as u8]))
    }

    #[test]
    fn native_frames_get_small_defects() {
        let surface = GrayImage::from_fn(256, 256, |x, y| Luma([(100 + (x * 7 + y * 3) % 60) as u8]));
        let foreign = GrayImage::from_fn(300, 300, |x, y| Luma([((x * y) % 256) as u8]));
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for kind in DefectKind::ALL {
            for scale in [0.6, 1.6] {
                let mut painted = surface.clone();
                let mask = paint(&mut painted, 64.0, kind, scale, true, &foreign, &mut rng);
                let marked: Vec<(u32, u32)> =
                    mask.enumerate_pixels().filter(|(_, _, m)| m.0[0] != 0).map(|(x, y, _)| (x, y)).collect();
                let span = |f: fn(&(u32, u32)) -> u32| {
                    marked.iter().map(f).max().unwrap() - marked.iter().map(f).min().unwrap() + 1
                };
                let (w, h) = (span(|p| p.0), span(|p| p.1));
                assert!(marked.len() >= 3 && w.max(h) <= 64, "{kind:?} ×{scale}: {w}×{h} px, {} px", marked.len());
            }
        }
    }

    #[test]
    fn transplants_change_only_their_blob_and_bring_other_texture() {
        let surface = GrayImage::from_fn(64, 48, |x, y| Luma([(100 + (x * 7 + y * 3) % 60) as u8]));
        let donor = GrayImage::from_fn(64, 48, |x, y| Luma([(40 + (x * 11 + y * 5) % 170) as u8]));
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..20 {
            let mut painted = surface.clone();
            let mask = paste_transplant(&mut painted, &donor, &mut rng);
            let marked = mask.pixels().filter(|m| m.0[0] != 0).count();
            assert!((3..64 * 48 / 2).contains(&marked), "{marked} px");
            let mut changed = 0;
            for (x, y, m) in mask.enumerate_pixels() {
                let differs = painted.get_pixel(x, y) != surface.get_pixel(x, y);
                assert!(m.0[0] != 0 || !differs, "({x}, {y}) changed outside the mask");
                changed += usize::from(differs);
            }
            assert!(changed * 2 > marked, "only {changed} of {marked} blob pixels changed");
        }
    }

    #[test]
    fn masks_cover_exactly_the_painted_pixels() {
        let surface = texture();
        let foreign = GrayImage::from_fn(200, 200, |x, y| Luma([((x * y) % 256) as u8]));
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for kind in DefectKind::ALL {
            for (scale, high) in [(0.6, false), (1.6, true)] {
                let mut painted = imageops::crop_imm(&surface, 0, 0, 64, 64).to_image();
                let before = painted.clone();
                let mask = paint(&mut painted, 64.0, kind, scale, high, &foreign, &mut rng);
                let (mut inside, mut changed_inside) = (0, 0);
                for (x, y, m) in mask.enumerate_pixels() {
                    let changed = painted.get_pixel(x, y) != before.get_pixel(x, y);
                    if m.0[0] == 0 {
                        assert!(!changed, "{kind:?}: pixel ({x},{y}) changed outside the mask");
                    } else {
                        inside += 1;
                        changed_inside += usize::from(changed);
                    }
                }
                assert!(inside >= 3, "{kind:?} scale {scale}: mask of {inside} px");
                assert!(changed_inside * 2 > inside, "{kind:?}: only {changed_inside}/{inside} mask pixels changed");
            }
        }
    }

    #[test]
    fn datasets_are_seeded_and_contamination_is_as_defined() {
        let dir = tempfile::tempdir().unwrap();
        let texture_path = dir.path().join("t.png");
        GrayImage::from_fn(200, 160, |x, y| Luma([((x * 31 + y * 17) % 251) as u8])).save(&texture_path).unwrap();
        let config = SynthConfig {
            size: 32,
            crop: 64,
            train: 10,
            test_good: 2,
            test_per_type: 1,
            contamination: 0.3,
            seed: 9,
            defect_extent: None,
            held_out_families: false,
        };
        let a = synthesise(&texture_path, None, &dir.path().join("a"), &config, false).unwrap();
        let b = synthesise(&texture_path, None, &dir.path().join("b"), &config, false).unwrap();
        assert_eq!((a.train_normal, a.train_defective), (7, 3));
        assert_eq!(a.contaminated_train.len(), 3);
        for file in ["train/good/004.png", "test/hole/000.png", "ground_truth/crack/000_mask.png"] {
            assert_eq!(
                std::fs::read(dir.path().join("a").join(file)).unwrap(),
                std::fs::read(dir.path().join("b").join(file)).unwrap()
            );
        }
        assert_eq!(
            a.contaminated_train.iter().map(|d| &d.file).collect::<Vec<_>>(),
            b.contaminated_train.iter().map(|d| &d.file).collect::<Vec<_>>()
        );
        // Another contamination level, same seed: the identical test set.
        let clean = SynthConfig { contamination: 0.0, ..config.clone() };
        synthesise(&texture_path, None, &dir.path().join("clean"), &clean, false).unwrap();
        for file in ["test/good/001.png", "test/foreign/000.png", "ground_truth/scratch/000_mask.png"] {
            assert_eq!(
                std::fs::read(dir.path().join("a").join(file)).unwrap(),
                std::fs::read(dir.path().join("clean").join(file)).unwrap()
            );
        }
        let img = image::open(dir.path().join("a/test/good/000.png")).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32));
        // Never silently replaced; bad ratios and tiny textures are errors.
        assert!(matches!(
            synthesise(&texture_path, None, &dir.path().join("a"), &config, false),
            Err(SynthError::Exists { .. })
        ));
        let bad = SynthConfig { contamination: 1.0, ..config.clone() };
        assert!(matches!(
            synthesise(&texture_path, None, &dir.path().join("c"), &bad, false),
            Err(SynthError::Contamination(_))
        ));
        // The held-out families are added after the others, which stay as they were.
        let held_out = SynthConfig { held_out_families: true, ..config.clone() };
        let h = synthesise(&texture_path, None, &dir.path().join("h"), &held_out, false).unwrap();
        assert_eq!(h.test_types, ["scratch", "hole", "stain", "crack", "foreign", "wear", "dent"]);
        assert_eq!(a.test_types.len(), 5);
        for file in ["test/good/001.png", "test/foreign/000.png", "train/good/004.png"] {
            assert_eq!(
                std::fs::read(dir.path().join("a").join(file)).unwrap(),
                std::fs::read(dir.path().join("h").join(file)).unwrap()
            );
        }
        for kind in ["wear", "dent"] {
            let mask = image::open(dir.path().join(format!("h/ground_truth/{kind}/000_mask.png"))).unwrap();
            assert!(mask.to_luma8().pixels().any(|p| p.0[0] == 255), "{kind}: empty mask");
        }
        let big = SynthConfig { crop: 190, ..config };
        let e = synthesise(&texture_path, None, &dir.path().join("d"), &big, false).unwrap_err().to_string();
        assert!(e.contains("200x160"), "{e}");
    }

    /// Wear and dents change the texture inside their mask and nothing outside it; wear
    /// keeps the brightness there.
    #[test]
    fn held_out_families_change_only_their_mask() {
        let base = GrayImage::from_fn(64, 64, |x, y| {
            Luma([(100.0 + 60.0 * ((x as f64 * 0.9).sin() * (y as f64 * 0.7).cos())) as u8])
        });
        for kind in DefectKind::HELD_OUT {
            for seed in 0..6 {
                let mut img = base.clone();
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let mask = paint(&mut img, 64.0, kind, 1.0, true, &GrayImage::new(1, 1), &mut rng);
                let (mut changed, mut before, mut after, mut n) = (0, 0.0, 0.0, 0.0);
                for (x, y, m) in mask.enumerate_pixels() {
                    let (a, b) = (base.get_pixel(x, y).0[0], img.get_pixel(x, y).0[0]);
                    if m.0[0] == 0 {
                        assert_eq!(a, b, "{kind:?} changed ({x}, {y}) outside its mask");
                    } else {
                        changed += usize::from(a != b);
                        (before, after, n) = (before + a as f64, after + b as f64, n + 1.0);
                    }
                }
                assert!(changed as f64 > 0.3 * n, "{kind:?}: only {changed} of {n} mask pixels changed");
                if kind == DefectKind::Wear {
                    assert!(
                        ((after - before) / n).abs() < 12.0,
                        "wear shifted the brightness by {}",
                        (after - before) / n
                    );
                }
            }
        }
    }
}

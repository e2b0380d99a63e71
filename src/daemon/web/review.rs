//! The review page's alerts: the frames the recorder kept as flagged
//! (`<store>/<camera>/flagged/<id>.png` with `<id>_mask.png`, the `<id>.json` sidecar and
//! an operator's `<id>.label.json`), read from the capture store, newest first, within the
//! review window; and the store's files served by name, the names checked so that a
//! request can only reach a recording.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::capture::labels::{Verdict, verdict_of};

/// Alerts listed on one page at most.
pub const MAX_LISTED: usize = 200;

/// What the list shows of a flagged recording.
#[derive(Debug, Clone)]
pub struct Alert {
    pub camera: String,
    /// The recording's name, `<capture ms>-<seq>`.
    pub id: String,
    pub seq: u64,
    pub captured_at: String,
    pub score: f64,
    pub normalised_score: f64,
    pub regions: usize,
    pub model: String,
    pub part_id: Option<String>,
    pub label: Option<Verdict>,
}

/// The sidecar's fields the list reads (`daemon::recorder` writes them).
#[derive(Deserialize)]
struct Sidecar {
    seq: u64,
    captured_at: String,
    score: f64,
    normalised_score: f64,
    #[serde(default)]
    regions: Vec<serde_json::Value>,
    model: SidecarModel,
    part_id: Option<String>,
}

#[derive(Deserialize)]
struct SidecarModel {
    name: String,
}

/// Which alerts to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabelFilter {
    #[default]
    All,
    Unlabelled,
    Defect,
    Normal,
}

impl LabelFilter {
    pub const ALL: [(Self, &str); 4] =
        [(Self::All, "all"), (Self::Unlabelled, "unlabelled"), (Self::Defect, "defect"), (Self::Normal, "normal")];

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, name)| *name == text).map(|(f, _)| *f)
    }

    fn admits(self, label: Option<Verdict>) -> bool {
        match self {
            Self::All => true,
            Self::Unlabelled => label.is_none(),
            Self::Defect => label == Some(Verdict::Defect),
            Self::Normal => label == Some(Verdict::Normal),
        }
    }
}

/// Whether `id` is a recording name (`<digits>-<digits>`): nothing else is served.
fn is_recording_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(ms, seq)| {
        [ms, seq].iter().all(|part| !part.is_empty() && part.len() <= 20 && part.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The flagged alerts of `cameras` captured after `since`, newest first, at most
/// [`MAX_LISTED`]; a sidecar that cannot be read is skipped.
pub fn alerts(store: &Path, cameras: &[String], since: SystemTime, filter: LabelFilter) -> Vec<Alert> {
    let since_ms = since.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    let mut found: Vec<(u128, String, PathBuf)> = Vec::new();
    for camera in cameras {
        let Ok(entries) = std::fs::read_dir(store.join(camera).join("flagged")) else { continue };
        for path in entries.flatten().map(|e| e.path()) {
            let Some(id) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Some(ms) = id.split_once('-').and_then(|(ms, _)| ms.parse::<u128>().ok()) else { continue };
            if is_recording_id(id) && ms >= since_ms {
                found.push((ms, camera.clone(), path.clone()));
            }
        }
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found
        .into_iter()
        .filter_map(|(_, camera, sidecar)| read(&camera, &sidecar))
        .filter(|a| filter.admits(a.label))
        .take(MAX_LISTED)
        .collect()
}

fn read(camera: &str, sidecar: &Path) -> Option<Alert> {
    let bytes = std::fs::read(sidecar).ok()?;
    let s: Sidecar = serde_json::from_slice(&bytes).ok()?;
    let id = sidecar.file_stem()?.to_str()?.to_string();
    let label = verdict_of(&sidecar.with_extension("png"));
    Some(Alert {
        camera: camera.to_string(),
        id,
        seq: s.seq,
        captured_at: s.captured_at,
        score: s.score,
        normalised_score: s.normalised_score,
        regions: s.regions.len(),
        model: s.model.name,
        part_id: s.part_id,
        label,
    })
}

/// The image `file` (`frame.png` or `mask.png`) of recording `id` of `camera`, if the
/// names are a configured camera and a recording name.
pub fn image(store: &Path, cameras: &[String], camera: &str, id: &str, file: &str) -> Option<Vec<u8>> {
    if !cameras.iter().any(|c| c == camera) || !is_recording_id(id) {
        return None;
    }
    let name = match file {
        "frame.png" => format!("{id}.png"),
        "mask.png" => format!("{id}_mask.png"),
        _ => return None,
    };
    std::fs::read(store.join(camera).join("flagged").join(name)).ok()
}

/// Recording `id`'s frame with its mask tinted red and outlined, as PNG (the mask is
/// scaled to the frame: it is at inspection resolution, the frame as recorded).
pub fn overlay(store: &Path, cameras: &[String], camera: &str, id: &str) -> Option<Vec<u8>> {
    let frame = image::load_from_memory(&image(store, cameras, camera, id, "frame.png")?).ok()?.to_rgb8();
    let mask = image::load_from_memory(&image(store, cameras, camera, id, "mask.png")?).ok()?.to_luma8();
    let (w, h) = frame.dimensions();
    let mask = image::imageops::resize(&mask, w, h, image::imageops::FilterType::Nearest);
    let inside = |x: i64, y: i64| {
        x >= 0 && y >= 0 && x < i64::from(w) && y < i64::from(h) && mask.get_pixel(x as u32, y as u32).0[0] > 127
    };
    let mut out = frame;
    for (x, y, pixel) in out.enumerate_pixels_mut() {
        let (x, y) = (i64::from(x), i64::from(y));
        if !inside(x, y) {
            continue;
        }
        let edge = [(-1, 0), (1, 0), (0, -1), (0, 1)].iter().any(|(dx, dy)| !inside(x + dx, y + dy));
        pixel.0 = if edge { [255, 0, 0] } else { [pixel.0[0].saturating_add(90), pixel.0[1] / 2, pixel.0[2] / 2] };
    }
    let mut png = std::io::Cursor::new(Vec::new());
    out.write_to(&mut png, image::ImageFormat::Png).ok()?;
    Some(png.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar(seq: u64) -> String {
        format!(
            r#"{{"schema":1,"camera":"cam0","seq":{seq},"captured_at":"t","score":2.0,"normalised_score":0.8,"regions":[{{}}],"model":{{"name":"m","version":"1","sha256":"x"}}}}"#
        )
    }

    #[test]
    fn alerts_are_listed_newest_first_within_the_window_and_by_label() {
        let store = tempfile::tempdir().unwrap();
        let flagged = store.path().join("cam0/flagged");
        std::fs::create_dir_all(&flagged).unwrap();
        for (ms, seq) in [(1_000u64, 1), (5_000, 2), (9_000, 3)] {
            std::fs::write(flagged.join(format!("{ms}-{seq:06}.json")), sidecar(seq)).unwrap();
            std::fs::write(flagged.join(format!("{ms}-{seq:06}.png")), b"png").unwrap();
        }
        std::fs::write(flagged.join("junk.json"), b"{").unwrap();
        crate::capture::labels::write_label(store.path(), "cam0", 2, Verdict::Normal, "web").unwrap();
        let cams = ["cam0".to_string()];
        let since = UNIX_EPOCH + std::time::Duration::from_secs(2);
        let seqs = |f| alerts(store.path(), &cams, since, f).iter().map(|a| a.seq).collect::<Vec<_>>();
        assert_eq!(seqs(LabelFilter::All), [3, 2], "newest first, the one before the window left out");
        assert_eq!(seqs(LabelFilter::Normal), [2]);
        assert_eq!(seqs(LabelFilter::Unlabelled), [3]);
        assert!(seqs(LabelFilter::Defect).is_empty());
        let listed = alerts(store.path(), &cams, since, LabelFilter::All);
        assert_eq!((listed[0].regions, listed[0].model.as_str(), listed[0].id.as_str()), (1, "m", "9000-000003"));
    }

    #[test]
    fn only_recordings_of_configured_cameras_are_served() {
        let store = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(store.path().join("cam0/flagged")).unwrap();
        std::fs::write(store.path().join("cam0/flagged/10-000001.png"), b"frame").unwrap();
        std::fs::write(store.path().join("secret.png"), b"no").unwrap();
        let cams = ["cam0".to_string()];
        assert_eq!(image(store.path(), &cams, "cam0", "10-000001", "frame.png").unwrap(), b"frame");
        for (camera, id, file) in [
            ("cam0", "../../secret", "frame.png"),
            ("..", "10-000001", "frame.png"),
            ("cam0", "10-000001", "x.json"),
            ("cam1", "10-000001", "frame.png"),
        ] {
            assert!(image(store.path(), &cams, camera, id, file).is_none(), "{camera}/{id}/{file}");
        }
    }
}

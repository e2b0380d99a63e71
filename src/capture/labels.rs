//! Operator verdicts on recorded frames: "that one was (not) a defect". A label is a small
//! JSON file beside the frame in the capture store, `<camera>/<class>/<id>.label.json` for
//! `<id>.png`, written atomically; the recorder prunes it with its frame. `retrain` leaves
//! out frames labelled `defect`; `eval` reads the labelled frames as an evaluation set.
//!
//! Frames are named `<capture ms>-<seq>` by the recorder; a sequence number restarts with
//! the daemon, so a label names the newest recording of that camera and sequence number.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable::write_atomic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Defect,
    Normal,
}

/// The label file's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Label {
    pub verdict: Verdict,
    pub labelled_at: String,
    /// Who labelled it: `mqtt`, `web` (the review page) or `cli`.
    pub source: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("camera '{camera}': no recorded frame with sequence number {seq} in {store}")]
    NoRecording { camera: String, seq: u64, store: PathBuf },
    #[error("{path}: cannot write the label: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The label file of a recorded frame.
pub fn label_path(frame: &Path) -> PathBuf {
    let stem = frame.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    frame.with_file_name(format!("{stem}.label.json"))
}

/// The verdict on `frame`, if it has a readable label.
pub fn verdict_of(frame: &Path) -> Option<Verdict> {
    let bytes = std::fs::read(label_path(frame)).ok()?;
    serde_json::from_slice::<Label>(&bytes).ok().map(|l| l.verdict)
}

/// The newest recording of `camera` with sequence number `seq` in `store`.
pub fn find_recording(store: &Path, camera: &str, seq: u64) -> Option<PathBuf> {
    let suffix = format!("-{seq:06}.png");
    ["flagged", "normal"]
        .iter()
        .filter_map(|class| std::fs::read_dir(store.join(camera).join(class)).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(&suffix)))
        .max_by_key(|p| p.file_name().map(|n| n.to_os_string()))
}

/// Labels the newest recording of `camera`/`seq`; returns the label file.
pub fn write_label(
    store: &Path,
    camera: &str,
    seq: u64,
    verdict: Verdict,
    source: &str,
) -> Result<PathBuf, LabelError> {
    let frame = find_recording(store, camera, seq).ok_or_else(|| LabelError::NoRecording {
        camera: camera.into(),
        seq,
        store: store.into(),
    })?;
    let labelled_at = crate::timestamp::now();
    let label = Label { verdict, labelled_at, source: source.into() };
    let path = label_path(&frame);
    let bytes = serde_json::to_vec_pretty(&label).expect("a label serialises");
    write_atomic(&path, &bytes).map_err(|source| LabelError::Write { path: path.clone(), source })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_lands_beside_the_newest_recording_of_that_sequence_number() {
        let store = tempfile::tempdir().unwrap();
        let flagged = store.path().join("cam0/flagged");
        let normal = store.path().join("cam0/normal");
        std::fs::create_dir_all(&flagged).unwrap();
        std::fs::create_dir_all(&normal).unwrap();
        for f in [flagged.join("1000-000007.png"), normal.join("2000-000007.png"), normal.join("3000-000008.png")] {
            std::fs::write(f, b"png").unwrap();
        }
        let path = write_label(store.path(), "cam0", 7, Verdict::Defect, "cli").unwrap();
        assert_eq!(path, normal.join("2000-000007.label.json"), "the newer of the two recordings of seq 7");
        assert_eq!(verdict_of(&normal.join("2000-000007.png")), Some(Verdict::Defect));
        assert_eq!(verdict_of(&flagged.join("1000-000007.png")), None);
        let missing = write_label(store.path(), "cam0", 9, Verdict::Normal, "cli").unwrap_err();
        assert!(missing.to_string().contains("sequence number 9"), "{missing}");
    }
}

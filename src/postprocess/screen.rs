//! The cascade's first stage: which tiles are worth a reconstruction.
//!
//! The normal-patch model's map is computed for every tile anyway (it is fused into the
//! shipped rule's map) and costs less than the reconstruction and the head together. A tile
//! whose patch map stays below the screen's threshold everywhere is declared clean without
//! them: the rule's map there is the rule's mean on normal frames, so the fused map is the
//! patch map's share alone. `retrain` chooses the threshold on its validation defects
//! ([`Screen::choose`]) for a recall target, and records what it keeps and saves.

use serde::{Deserialize, Serialize};

/// The recall the shipped screen is chosen for: the share of the validation defects' pixels
/// that must lie in tiles that go on to the reconstruction.
pub const DEFAULT_RECALL: f64 = 0.99;

/// The recall `retrain` ships for tiled inspection: at native resolution, over 3 seeds × 2
/// textures of held-out defects, the screen at 0.8 changed pixel AUROC by −0.0004 / +0.0008
/// against 0.99 (−0.010 on the worst seed) and screened a quarter to two fifths of the
/// tiles; at 64² (one tile per frame, where a screened tile is the whole frame) it lost
/// 0.008 / 0.029 (0.047 on the worst seed), so model-size frames keep [`DEFAULT_RECALL`]
/// (docs/performance.md).
pub const TILED_RECALL: f64 = 0.8;

/// The recalls `retrain` records a screen for besides the shipped one (the manifest's
/// `screen_curve`), so a faster or safer screen can be taken without retraining.
pub const SCREEN_RECALLS: [f64; 6] = [0.8, 0.9, 0.95, 0.98, 0.99, 0.999];

/// A screen on the patch map's maximum over a tile; stored in the manifest (`anomaly.screen`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Screen {
    /// A tile whose raw patch map reaches this anywhere is reconstructed; others are not.
    pub threshold: f64,
    /// The recall the threshold was chosen for.
    pub recall_target: f64,
    /// On the validation defects: the share of their pixels in tiles that pass.
    pub recall: f64,
    /// On the clean validation tiles: the share screened out (the work saved on clean frames).
    pub clean_screened: f64,
}

impl Screen {
    /// Whether a tile with this raw patch map goes on to the reconstruction.
    pub fn passes(&self, patch_map: &[f32]) -> bool {
        screen_score(patch_map) >= self.threshold
    }

    /// The highest threshold that keeps at least `recall_target` of the defect pixels of
    /// `defective` (per tile: its screen score and its defect pixel count) in tiles that
    /// pass; `clean` are the clean tiles' screen scores. None where there is nothing to keep
    /// (no defect pixel) or nothing to save (no clean tile would be screened out).
    pub fn choose(defective: &[(f64, usize)], clean: &[f64], recall_target: f64) -> Option<Self> {
        let total: usize = defective.iter().map(|(_, pixels)| pixels).sum();
        if total == 0 || clean.is_empty() {
            return None;
        }
        let mut by_score: Vec<(f64, usize)> = defective.iter().copied().filter(|(_, p)| *p > 0).collect();
        by_score.sort_by(|a, b| b.0.total_cmp(&a.0));
        let needed = recall_target * total as f64;
        let mut kept = 0usize;
        let mut threshold = f64::NEG_INFINITY;
        for (score, pixels) in by_score {
            kept += pixels;
            threshold = score;
            if kept as f64 >= needed {
                break;
            }
        }
        let recall =
            defective.iter().filter(|(s, _)| *s >= threshold).map(|(_, p)| p).sum::<usize>() as f64 / total as f64;
        let clean_screened = clean.iter().filter(|&&s| s < threshold).count() as f64 / clean.len() as f64;
        (clean_screened > 0.0).then_some(Self { threshold, recall_target, recall, clean_screened })
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.threshold.is_finite() {
            return Err(format!("anomaly.screen.threshold must be finite, got {}", self.threshold));
        }
        if !is_recall(self.recall_target) {
            return Err(format!("anomaly.screen.recall_target must be in (0, 1], got {}", self.recall_target));
        }
        Ok(())
    }
}

/// Which of a bundle's screens runs (the daemon's `model.screen_recall`, `eval`'s and
/// `bench`'s `--no-screen` / `--screen-recall`): a line trades recall for speed without
/// retraining, among the screens `retrain` chose on its validation defects.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(try_from = "ScreenChoiceRepr")]
pub enum ScreenChoice {
    /// The manifest's `anomaly.screen`, if it has one.
    #[default]
    Bundle,
    /// Every tile is reconstructed.
    Off,
    /// The manifest's `screen_curve` entry for this recall target.
    Recall(f64),
}

/// The TOML form: `"bundle"`, `"off"` or a recall in (0, 1].
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ScreenChoiceRepr {
    Recall(f64),
    Name(String),
}

impl TryFrom<ScreenChoiceRepr> for ScreenChoice {
    type Error = String;

    fn try_from(repr: ScreenChoiceRepr) -> Result<Self, String> {
        match repr {
            ScreenChoiceRepr::Recall(r) if is_recall(r) => Ok(Self::Recall(r)),
            ScreenChoiceRepr::Recall(r) => Err(format!("a recall must be in (0, 1], got {r}")),
            ScreenChoiceRepr::Name(name) if name == "bundle" => Ok(Self::Bundle),
            ScreenChoiceRepr::Name(name) if name == "off" => Ok(Self::Off),
            ScreenChoiceRepr::Name(name) => Err(format!("expected \"bundle\", \"off\" or a recall, got {name:?}")),
        }
    }
}

/// Whether `r` is a recall a screen can be chosen for: in (0, 1].
pub fn is_recall(r: f64) -> bool {
    r > 0.0 && r <= 1.0
}

impl ScreenChoice {
    /// The choice of the command-line flags `--no-screen` and `--screen-recall R`.
    pub fn from_flags(no_screen: bool, recall: Option<f64>) -> Self {
        match (no_screen, recall) {
            (true, _) => Self::Off,
            (false, Some(r)) => Self::Recall(r),
            (false, None) => Self::Bundle,
        }
    }
}

/// A tile's screen score: the maximum of its raw patch map.
pub fn screen_score(patch_map: &[f32]) -> f64 {
    patch_map.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_screen_keeps_the_recall_target_of_defect_pixels_and_no_more() {
        // Defective tiles (score, defect pixels): 100 pixels in all.
        let defective = [(9.0, 50), (7.0, 30), (5.0, 15), (3.0, 4), (1.0, 1)];
        let clean = [0.5, 2.0, 4.0, 6.0];
        // 95 % needs the tiles down to 5.0: clean tiles below it are screened out.
        let s = Screen::choose(&defective, &clean, 0.95).unwrap();
        assert_eq!((s.threshold, s.recall), (5.0, 0.95));
        assert_eq!(s.clean_screened, 0.75);
        // 96 % needs the tile at 3.0 as well: a threshold between would lose it.
        let s = Screen::choose(&defective, &clean, 0.96).unwrap();
        assert_eq!((s.threshold, s.recall, s.clean_screened), (3.0, 0.99, 0.5));
        assert!(s.passes(&[0.0, 3.0]) && !s.passes(&[2.9, 1.0]));
        // Full recall keeps every defective tile; if no clean tile is then saved, no screen.
        assert_eq!(Screen::choose(&defective, &clean, 1.0).unwrap().threshold, 1.0);
        assert!(Screen::choose(&defective, &[0.5, 2.0], 1.0).is_some());
        assert!(Screen::choose(&defective, &[1.0, 2.0], 1.0).is_none(), "nothing saved");
        assert!(Screen::choose(&[(4.0, 0)], &clean, 0.99).is_none(), "nothing to keep");
    }
}

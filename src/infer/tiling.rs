//! Cutting a frame into model-size tiles and stitching per-tile maps back together.
//!
//! Line cameras deliver frames far larger than the model's input; a scratch a few pixels
//! wide disappears when the frame is shrunk to it. So a frame is inspected at the scale
//! the model was trained at, in overlapping tiles of the model's input size (anomalib's
//! `Tiler` convention): tiles start every `stride` pixels, the last tile of a row or column
//! is aligned to the frame's border (no padding, so no padding artefacts), and stitched
//! maps average every tile that covers a pixel. Each tile's noise is seeded from the frame's
//! seed and the tile's index, so a result never depends on which tiles shared a batch.

/// One tile: its index in row-major tile order and its top-left corner in the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub index: usize,
    pub x: usize,
    pub y: usize,
}

/// Tile layout of a frame; `tile` is the model's input size `[height, width]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TileGrid {
    pub frame: [usize; 2],
    pub tile: [usize; 2],
    pub tiles: Vec<Tile>,
}

/// Tile starts along one axis: every `stride`, the last one flush with the end.
fn starts(length: usize, tile: usize, stride: usize) -> Vec<usize> {
    assert!(tile >= 1 && stride >= 1 && length >= tile, "starts: length {length}, tile {tile}, stride {stride}");
    let last = length - tile;
    let mut out: Vec<usize> = (0..=last).step_by(stride).collect();
    if *out.last().expect("0 is always a start") != last {
        out.push(last);
    }
    out
}

impl TileGrid {
    /// Tiles of `tile` size covering `frame` (both `[height, width]`, frame at least one
    /// tile in each direction) with starts `stride` apart.
    pub fn new(frame: [usize; 2], tile: [usize; 2], stride: [usize; 2]) -> Self {
        let rows = starts(frame[0], tile[0], stride[0]);
        let cols = starts(frame[1], tile[1], stride[1]);
        let tiles = rows
            .iter()
            .flat_map(|&y| cols.iter().map(move |&x| (x, y)))
            .enumerate()
            .map(|(index, (x, y))| Tile { index, x, y })
            .collect();
        Self { frame, tile, tiles }
    }

    /// Copies tile `t` out of a `[C, H, W]` frame tensor into `out` (`[C, th, tw]`).
    pub fn cut(&self, frame: &[f32], channels: usize, t: Tile, out: &mut Vec<f32>) {
        let ([h, w], [th, tw]) = (self.frame, self.tile);
        assert_eq!(frame.len(), channels * h * w, "cut: frame is not {channels}x{h}x{w}");
        out.clear();
        for c in 0..channels {
            for row in t.y..t.y + th {
                let start = c * h * w + row * w + t.x;
                out.extend_from_slice(&frame[start..start + tw]);
            }
        }
    }

    /// Whether tile `t` holds a pixel that `mask` (`[H, W]` of the frame, 1 = inspected)
    /// inspects.
    pub fn inspects(&self, t: Tile, mask: &[u8]) -> bool {
        let ([_, w], [th, tw]) = (self.frame, self.tile);
        (t.y..t.y + th).any(|row| mask[row * w + t.x..row * w + t.x + tw].iter().any(|&m| m != 0))
    }

    /// An accumulator that averages per-tile maps into one frame map.
    pub fn stitcher(&self) -> Stitcher {
        let [h, w] = self.frame;
        Stitcher { frame: self.frame, tile: self.tile, sum: vec![0.0; h * w], count: vec![0; h * w] }
    }
}

/// Sums tile maps as they arrive (a frame's tiles may span several batches) and averages
/// where tiles overlap. Holds one frame-size map, never all tile maps at once.
pub struct Stitcher {
    frame: [usize; 2],
    tile: [usize; 2],
    sum: Vec<f32>,
    count: Vec<u16>,
}

impl Stitcher {
    /// Adds the `[th, tw]` map of tile `t`.
    pub fn add(&mut self, t: Tile, map: &[f32]) {
        let ([_, w], [th, tw]) = (self.frame, self.tile);
        assert_eq!(map.len(), th * tw, "stitch: tile map is not {th}x{tw}");
        for row in 0..th {
            let start = (t.y + row) * w + t.x;
            for (col, v) in map[row * tw..(row + 1) * tw].iter().enumerate() {
                self.sum[start + col] += v;
                self.count[start + col] += 1;
            }
        }
    }

    /// The averaged frame map; every pixel must have been covered.
    pub fn finish(self) -> Vec<f32> {
        assert!(self.count.iter().all(|n| *n > 0), "stitch: a pixel no tile covered");
        self.sum.iter().zip(&self.count).map(|(s, n)| s / *n as f32).collect()
    }

    /// The averaged frame map where `mask` (1 = inspected) inspects, `fill` elsewhere (and
    /// where no tile was computed: tiles the mask excludes are skipped).
    pub fn finish_masked(self, mask: &[u8], fill: f32) -> Vec<f32> {
        assert_eq!(mask.len(), self.sum.len(), "stitch: the mask is not the frame's size");
        let cells = self.sum.iter().zip(&self.count).zip(mask);
        cells.map(|((s, n), m)| if *m == 0 || *n == 0 { fill } else { s / *n as f32 }).collect()
    }
}

/// The noise seed of tile `index` of a frame seeded `frame_seed`; tile 0 keeps the frame's
/// seed, so a one-tile frame is reconstructed exactly as an untiled one.
pub fn tile_seed(frame_seed: u64, index: usize) -> u64 {
    frame_seed.wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_cover_the_axis_with_the_last_tile_flush() {
        assert_eq!(starts(64, 64, 48), vec![0]);
        assert_eq!(starts(128, 64, 48), vec![0, 48, 64]);
        assert_eq!(starts(160, 64, 48), vec![0, 48, 96]);
        assert_eq!(starts(100, 64, 64), vec![0, 36]);
        assert_eq!(starts(7, 3, 1), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn stitching_a_constant_map_is_exact_and_every_pixel_is_covered() {
        for (frame, stride) in [([64, 64], 64), ([100, 130], 48), ([1024, 1280], 48), ([65, 64], 17)] {
            let grid = TileGrid::new(frame, [64, 64], [stride, stride]);
            let mut stitcher = grid.stitcher();
            for t in &grid.tiles {
                stitcher.add(*t, &[0.25f32; 64 * 64]);
            }
            let stitched = stitcher.finish();
            assert_eq!(stitched.len(), frame[0] * frame[1]);
            assert!(stitched.iter().all(|v| *v == 0.25), "{frame:?} stride {stride}");
            assert!(grid.tiles.iter().all(|t| t.x + 64 <= frame[1] && t.y + 64 <= frame[0]));
        }
    }

    #[test]
    fn cut_then_stitch_returns_the_frame() {
        let (h, w) = (37, 50);
        let frame: Vec<f32> = (0..2 * h * w).map(|i| i as f32).collect();
        let grid = TileGrid::new([h, w], [16, 16], [10, 10]);
        let mut tile = Vec::new();
        let mut stitcher = grid.stitcher();
        for t in &grid.tiles {
            grid.cut(&frame, 2, *t, &mut tile);
            assert_eq!(tile.len(), 2 * 16 * 16);
            assert_eq!(tile[0], frame[t.y * w + t.x]);
            assert_eq!(tile[16 * 16], frame[h * w + t.y * w + t.x], "second channel");
            stitcher.add(*t, &tile[..16 * 16]);
        }
        assert_eq!(stitcher.finish(), frame[..h * w].to_vec());
    }

    #[test]
    fn tile_zero_keeps_the_frame_seed() {
        assert_eq!(tile_seed(42, 0), 42);
        assert_ne!(tile_seed(42, 1), tile_seed(43, 0));
        assert_ne!(tile_seed(42, 1), tile_seed(42, 2));
    }
}

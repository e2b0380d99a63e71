//! From a frame and its reconstruction to what the line sees: maps, verdicts, images.

pub mod anomaly;
pub mod render;
pub mod screen;

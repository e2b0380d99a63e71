//! Evaluation of a bundle against labelled data (`eval`): threshold-free metrics first.

pub mod metrics;

//! Subcommand implementations; each is a thin `run(args)` over the library.

pub mod bench;
pub mod eval;
#[cfg(feature = "train")]
pub mod export;
pub mod fleet;
pub mod infer;
pub mod label;
#[cfg(feature = "train")]
pub mod retrain;
pub mod run;
pub mod synth;

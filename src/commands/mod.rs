//! Subcommand implementations; each is a thin `run(args)` over the library.

pub mod bench;
#[cfg(feature = "train")]
pub mod export;
pub mod infer;
#[cfg(feature = "train")]
pub mod retrain;

//! Subcommand implementations; each is a thin `run(args)` over the library.

#[cfg(feature = "train")]
pub mod export;
pub mod infer;
#[cfg(feature = "train")]
pub mod retrain;

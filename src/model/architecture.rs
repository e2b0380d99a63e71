//! The UNet's hyper-parameters: the part of the architecture that the manifest records.
//!
//! Kept free of burn so that the edge build (no `train` feature) can still read and
//! validate a bundle's architecture. The layers themselves live in `model::unet`.

use serde::{Deserialize, Serialize};

/// Shape of the ε-prediction UNet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    /// Image channels in and out: 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Width of the first level; level `i` has `base_channels * channel_mults[i]`.
    pub base_channels: usize,
    /// One entry per resolution level; every level but the last halves H and W.
    pub channel_mults: Vec<usize>,
    /// Residual blocks per level on the way down (and up).
    pub res_blocks: usize,
    /// One-head self-attention between the two middle blocks (lowest resolution).
    pub attention: bool,
    /// GroupNorm groups; must divide every level's width.
    pub groups: usize,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            channels: 1,
            base_channels: 32,
            channel_mults: vec![1, 2, 2],
            res_blocks: 1,
            attention: false,
            groups: 8,
        }
    }
}

/// A configuration the UNet cannot be built from.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArchitectureError {
    #[error("unet.channels must be 1 or 3 (a denoiser) or 2 or 6 (a head), got {0}")]
    Channels(usize),
    #[error("unet.channel_mults must not be empty")]
    NoLevels,
    #[error("unet.res_blocks must be at least 1")]
    NoResBlocks,
    #[error("unet.groups ({groups}) must divide every level width, but not {width}")]
    Groups { groups: usize, width: usize },
    #[error("unet.base_channels must be even (sinusoidal embedding pairs sin/cos), got {0}")]
    OddBase(usize),
    #[error("input size {height}x{width} must be a multiple of {multiple} for {levels} levels")]
    InputSize { height: usize, width: usize, multiple: usize, levels: usize },
}

impl UNetConfig {
    pub fn validate(&self) -> Result<(), ArchitectureError> {
        // 1 or 3: frames (the denoiser); 2 or 6: a frame and its reconstruction (the head).
        if ![1, 2, 3, 6].contains(&self.channels) {
            return Err(ArchitectureError::Channels(self.channels));
        }
        if self.channel_mults.is_empty() {
            return Err(ArchitectureError::NoLevels);
        }
        if self.res_blocks == 0 {
            return Err(ArchitectureError::NoResBlocks);
        }
        if self.base_channels == 0 || self.base_channels % 2 == 1 {
            return Err(ArchitectureError::OddBase(self.base_channels));
        }
        for width in self.level_widths() {
            if self.groups == 0 || width % self.groups != 0 {
                return Err(ArchitectureError::Groups { groups: self.groups, width });
            }
        }
        Ok(())
    }

    /// Channel width of each resolution level.
    pub fn level_widths(&self) -> Vec<usize> {
        self.channel_mults.iter().map(|m| m * self.base_channels).collect()
    }

    /// Width of the time embedding after its MLP.
    pub fn time_dim(&self) -> usize {
        self.base_channels * 4
    }

    /// Input sides must survive `levels − 1` halvings exactly.
    pub fn check_input_size(&self, height: usize, width: usize) -> Result<(), ArchitectureError> {
        let multiple = 1 << (self.channel_mults.len() - 1);
        if height == 0 || width == 0 || !height.is_multiple_of(multiple) || !width.is_multiple_of(multiple) {
            return Err(ArchitectureError::InputSize { height, width, multiple, levels: self.channel_mults.len() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_checks_sizes() {
        let c = UNetConfig::default();
        c.validate().unwrap();
        c.check_input_size(64, 64).unwrap();
        assert!(matches!(c.check_input_size(62, 64), Err(ArchitectureError::InputSize { multiple: 4, .. })));
    }

    #[test]
    fn rejects_groups_that_do_not_divide() {
        let c = UNetConfig { base_channels: 12, groups: 8, ..UNetConfig::default() };
        assert_eq!(c.validate(), Err(ArchitectureError::Groups { groups: 8, width: 12 }));
    }
}

//! `edge-inspect synth`: writes a seeded benchmark dataset and says what is in it.

use crate::cli::SynthArgs;
use crate::eval::synth::{SynthConfig, synthesise};

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let config = SynthConfig {
        size: args.size,
        crop: args.crop,
        train: args.train,
        test_good: args.test_good,
        test_per_type: args.test_per_type,
        contamination: args.contamination,
        seed: args.seed,
        defect_extent: args.defect_extent,
        held_out_families: args.held_out_families,
    };
    let summary = synthesise(&args.texture, args.foreign.as_deref(), &args.out, &config, args.force)?;
    println!(
        "{}: train/good {} normal + {} defective (contamination {:.3}; {}), test/good {}, \
         {} per defect type ({}); details in synth.json",
        args.out.display(),
        summary.train_normal,
        summary.train_defective,
        summary.contamination,
        summary.contamination_definition,
        summary.test_good,
        summary.test_per_type,
        summary.test_types.join(", "),
    );
    Ok(())
}

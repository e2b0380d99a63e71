//! `edge-inspect label`: an operator's verdict on a recorded frame, from the shell.

use crate::capture::labels::{Verdict, write_label};
use crate::cli::{LabelArgs, VerdictArg};

pub fn run(args: LabelArgs) -> anyhow::Result<()> {
    let verdict = match args.verdict {
        VerdictArg::Defect => Verdict::Defect,
        VerdictArg::Normal => Verdict::Normal,
    };
    let path = write_label(&args.store, &args.camera, args.seq, verdict, "cli")?;
    println!("{}", path.display());
    Ok(())
}

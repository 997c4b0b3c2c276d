//! `cargo xtask demo`: build the workspace and run the demo (a cluster in a box).

use anyhow::Result;

use crate::{
    setup::run_setup,
    util::{cmd, require_root, run},
};

#[derive(clap::Args)]
pub struct Args {
    /// Do not run `cargo xtask setup` first.
    #[arg(long)]
    skip_setup: bool,
}

pub fn run_demo(args: Args) -> Result<()> {
    require_root("demo")?;
    if !args.skip_setup {
        run_setup()?;
    }
    run(cmd("cargo").args(["build", "--workspace"]))?;
    run(cmd("cargo").args(["run", "-p", "dataplane-tests", "--bin", "demo"]))
}

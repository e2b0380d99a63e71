//! `edge-inspect run` and `edge-inspect check-config`.

use crate::cli::RunArgs;
use crate::daemon;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = daemon::load_config(&args.config)?;
    daemon::run(config, &args.config)
}

/// Everything `run` checks before it starts: the config, then the bundle through ONNX
/// Runtime with the configured providers (the node's bundle and the cameras' own).
pub fn check_config(args: RunArgs) -> anyhow::Result<()> {
    let config = daemon::load_config(&args.config)?;
    daemon::load_bundles(&config, &args.config.display().to_string())?;
    println!(
        "{}: valid; node '{}', {} camera(s), model {}, MQTT {}:{} (topics {}/…)",
        args.config.display(),
        config.node_id,
        config.cameras.len(),
        config.model.path.display(),
        config.mqtt.host,
        config.mqtt.port,
        config.mqtt.base_topic
    );
    Ok(())
}

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
    #[cfg(feature = "genicam")]
    check_cameras(&config, &args.config)?;
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

/// GenICam cameras that can be reached are checked against themselves (pixel format,
/// feature names); one that cannot is said to be checked offline only.
#[cfg(feature = "genicam")]
fn check_cameras(config: &crate::config::DaemonConfig, path: &std::path::Path) -> anyhow::Result<()> {
    use crate::capture::SourceConfig;
    use crate::capture::genicam::check_camera;
    use crate::config::{ConfigErrors, ConfigIssue};
    let mut issues = Vec::new();
    for (i, camera) in config.cameras.iter().enumerate() {
        let SourceConfig::Genicam(settings) = &camera.source else { continue };
        match check_camera(settings) {
            Ok(true) => println!("camera '{}': checked against the camera", camera.id),
            Ok(false) => println!("camera '{}': not reachable from here; checked offline only", camera.id),
            Err(problems) => {
                issues.extend(problems.into_iter().map(|message| ConfigIssue { key: format!("cameras[{i}]"), message }))
            }
        }
    }
    if issues.is_empty() {
        return Ok(());
    }
    Err(ConfigErrors { source_name: path.display().to_string(), issues }.into())
}

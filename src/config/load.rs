//! From a file and the environment to raw sections: the TOML overlaid by
//! `EDGE_INSPECT__SECTION__KEY` variables (the `config` crate), each section deserialised
//! on its own so that every unknown key and type error is collected with its key path, then
//! handed to the validator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::raw::*;
use super::validate::Validator;
use super::{ConfigErrors, ConfigIssue, DaemonConfig, ENV_PREFIX};
use crate::infer::runtime::RuntimeConfig;

/// Reads `path` (TOML) overlaid by the environment, and validates it.
pub fn load(path: &Path) -> Result<DaemonConfig, ConfigErrors> {
    let vars: Vec<(String, String)> = std::env::vars().collect();
    load_with_env(path, &vars)
}

/// [`load`] with an explicit environment (tests).
pub fn load_with_env(path: &Path, env: &[(String, String)]) -> Result<DaemonConfig, ConfigErrors> {
    let errors = |issues| ConfigErrors { source_name: path.display().to_string(), issues };
    if !path.is_file() {
        return Err(errors(vec![ConfigIssue { key: "--config".into(), message: "file not found".into() }]));
    }
    let overrides: config::Map<String, String> = env.iter().cloned().collect();
    let merged = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        )
        .build()
        .map_err(|e| errors(vec![ConfigIssue { key: "(file)".into(), message: e.to_string() }]))?;
    let table: BTreeMap<String, config::Value> = merged
        .try_deserialize()
        .map_err(|e| errors(vec![ConfigIssue { key: "(root)".into(), message: e.to_string() }]))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let credentials = env.iter().find(|(k, _)| k == "CREDENTIALS_DIRECTORY").map(|(_, v)| PathBuf::from(v));
    from_table(table, base, credentials).map_err(errors)
}

/// Deserialises one section, recording unknown keys and type errors under `section`.
fn section<T: DeserializeOwned + Default>(
    table: &mut BTreeMap<String, config::Value>,
    name: &str,
    issues: &mut Vec<ConfigIssue>,
) -> T {
    let Some(value) = table.remove(name) else {
        return T::default();
    };
    parse(value, name, issues).unwrap_or_default()
}

fn parse<T: DeserializeOwned>(value: config::Value, key: &str, issues: &mut Vec<ConfigIssue>) -> Option<T> {
    let mut unknown = Vec::new();
    let result = serde_ignored::deserialize(value, |path| unknown.push(path.to_string()));
    for path in unknown {
        issues.push(ConfigIssue { key: format!("{key}.{path}"), message: "unknown key".into() });
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            issues.push(config_error_issue(key, e));
            None
        }
    }
}

/// Turns a `config` error into an issue whose key is the full path.
fn config_error_issue(prefix: &str, error: config::ConfigError) -> ConfigIssue {
    let join = |key: Option<String>| match key {
        Some(k) if !k.is_empty() => format!("{prefix}.{k}"),
        _ => prefix.to_string(),
    };
    match error {
        config::ConfigError::Type { unexpected, expected, key, .. } => {
            ConfigIssue { key: join(key), message: format!("invalid type: {unexpected}, expected {expected}") }
        }
        config::ConfigError::At { error, key, .. } => ConfigIssue { key: join(key), message: error.to_string() },
        other => ConfigIssue { key: prefix.to_string(), message: other.to_string() },
    }
}

const SECTIONS: [&str; 12] = [
    "node",
    "model",
    "runtime",
    "pipeline",
    "mqtt",
    "recorder",
    "http",
    "upload",
    "fleet",
    "events",
    "homeassistant",
    "cameras",
];

fn from_table(
    mut table: BTreeMap<String, config::Value>,
    base: &Path,
    credentials: Option<PathBuf>,
) -> Result<DaemonConfig, Vec<ConfigIssue>> {
    let mut issues = Vec::new();
    for key in table.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
        issues.push(ConfigIssue { key: key.clone(), message: "unknown section".into() });
    }
    let node: RawNode = section(&mut table, "node", &mut issues);
    let model: RawModel = section(&mut table, "model", &mut issues);
    let runtime: RuntimeConfig = section(&mut table, "runtime", &mut issues);
    let pipeline: RawPipeline = section(&mut table, "pipeline", &mut issues);
    let mqtt: RawMqtt = section(&mut table, "mqtt", &mut issues);
    let recorder: RawRecorder = section(&mut table, "recorder", &mut issues);
    let http: RawHttp = section(&mut table, "http", &mut issues);
    let upload: RawUpload = section(&mut table, "upload", &mut issues);
    let fleet: RawFleet = section(&mut table, "fleet", &mut issues);
    let events: RawEvents = section(&mut table, "events", &mut issues);
    let homeassistant: RawHomeAssistant = section(&mut table, "homeassistant", &mut issues);
    let cameras: Vec<config::Value> = match table.remove("cameras") {
        None => Vec::new(),
        Some(v) => parse(v, "cameras", &mut issues).unwrap_or_default(),
    };
    let cameras: Vec<RawCamera> =
        cameras.into_iter().enumerate().filter_map(|(i, v)| parse(v, &format!("cameras[{i}]"), &mut issues)).collect();
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let mut v = Validator { issues, credentials };
    let raw = RawConfig {
        node,
        model,
        runtime,
        pipeline,
        mqtt,
        recorder,
        http,
        upload,
        fleet,
        events,
        homeassistant,
        cameras,
    };
    let config = v.build(raw, &resolve);
    if v.issues.is_empty() { Ok(config) } else { Err(v.issues) }
}

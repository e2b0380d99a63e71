//! Property: whatever a config file says, loading it (and checking its bundle) gives a valid
//! config or a list of errors naming key paths — never a panic. The generator mixes the
//! hostile values found in the field (huge and tiny numbers, negative ones, NaN, odd ids,
//! empty lists) into otherwise plausible files, and environment overrides go through the
//! same checks.

use std::path::PathBuf;

use edge_inspect::config::load_with_env;
use proptest::prelude::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A TOML value that may be anything a person (or a script) could write.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        prop_oneof![Just(0i64), Just(-1), Just(1), Just(65535), Just(65536), Just(u32::MAX as i64 + 1)]
            .prop_map(|v| v.to_string()),
        prop_oneof![Just("1e-20"), Just("1e20"), Just("1e300"), Just("-0.5"), Just("nan"), Just("inf"), Just("0.0")]
            .prop_map(str::to_string),
        "[a-z./ +#-]{0,12}".prop_map(|s| format!("{s:?}")),
        Just("[]".to_string()),
        Just("[1, 2]".to_string()),
        Just("[0, 0, 4294967295, 4294967295]".to_string()),
        Just("true".to_string()),
    ]
}

const KEYS: &[(&str, &str)] = &[
    ("node", "id"),
    ("node", "drain_timeout_ms"),
    ("pipeline", "max_batch"),
    ("pipeline", "max_wait_ms"),
    ("pipeline", "queue_capacity"),
    ("runtime", "providers"),
    ("runtime", "intra_threads"),
    ("runtime", "tile_batch"),
    ("mqtt", "port"),
    ("mqtt", "keep_alive_s"),
    ("mqtt", "session_expiry_s"),
    ("mqtt", "reconnect_max_s"),
    ("mqtt", "outbox_max_bytes"),
    ("mqtt", "topic_prefix"),
    ("recorder", "max_bytes"),
    ("recorder", "max_age_days"),
    ("recorder", "max_side"),
    ("recorder", "min_free_bytes"),
    ("recorder", "normal_sample_rate"),
    ("model", "t0"),
    ("model", "steps"),
    ("model", "eta"),
    ("model", "screen_recall"),
];

const CAMERA_KEYS: &[&str] = &["id", "fps", "roi", "stall_timeout_ms", "width", "height", "device"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_config_is_valid_or_a_list_of_keyed_errors(
        section_values in proptest::collection::vec((0..KEYS.len(), value()), 0..6),
        camera_values in proptest::collection::vec((0..CAMERA_KEYS.len(), value()), 0..4),
        camera_source in prop_oneof![Just("replay"), Just("camera")],
        env_value in proptest::option::of(value()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut sections: std::collections::BTreeMap<&str, Vec<String>> = std::collections::BTreeMap::new();
        sections.entry("model").or_default().push(format!("path = {:?}", repo().join("models/brick-huber").display().to_string()));
        sections.entry("node").or_default().push(format!("state_dir = {:?}", dir.path().join("state").display().to_string()));
        for (key, v) in &section_values {
            let (section, name) = KEYS[*key];
            sections.entry(section).or_default().push(format!("{name} = {v}"));
        }
        let mut text = String::new();
        for (section, lines) in &sections {
            // A key given twice is a TOML error: keep the first.
            let mut seen = std::collections::BTreeSet::new();
            text.push_str(&format!("[{section}]\n"));
            for line in lines {
                if seen.insert(line.split(" = ").next().unwrap().to_string()) {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text.push_str(&format!(
            "[[cameras]]\nsource = \"{camera_source}\"\npath = {:?}\n",
            repo().join("data/brick/test/good").display().to_string()
        ));
        let mut seen = std::collections::BTreeSet::new();
        if !camera_values.iter().any(|(k, _)| CAMERA_KEYS[*k] == "id") {
            text.push_str("id = \"cam0\"\n");
        }
        for (key, v) in &camera_values {
            if seen.insert(*key) {
                text.push_str(&format!("{} = {v}\n", CAMERA_KEYS[*key]));
            }
        }
        let path = dir.path().join("edge-inspect.toml");
        std::fs::write(&path, &text).unwrap();
        let env: Vec<(String, String)> = env_value
            .map(|v| vec![("EDGE_INSPECT__PIPELINE__MAX_BATCH".to_string(), v.trim_matches('"').to_string())])
            .unwrap_or_default();
        // The property: no panic, and every error names where it is.
        let loaded = std::panic::catch_unwind(|| load_with_env(&path, &env));
        prop_assert!(loaded.is_ok(), "load panicked on:\n{text}");
        if let Err(errors) = loaded.unwrap() {
            prop_assert!(!errors.issues.is_empty(), "an error without issues for:\n{text}");
            for issue in &errors.issues {
                prop_assert!(!issue.key.is_empty() && !issue.message.is_empty(), "{issue:?} for:\n{text}");
            }
        }
    }
}

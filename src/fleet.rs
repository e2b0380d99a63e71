//! The fleet's model rollout protocol, shared by the nodes (`daemon::fleet` follows it)
//! and the operator's `edge-inspect fleet` command (which publishes it):
//!
//! - `<topic_prefix>/fleet/model` (retained): a [`Rollout`] — the bundle (name, version,
//!   the object-storage folder `retrain --publish` put it in, the sha256 of its manifest)
//!   and which nodes take it: `"all"`, a list of node ids, or `{"percent": N}` (a canary:
//!   each node is in or out by a hash of its id and the bundle, so a larger percentage of
//!   the same bundle keeps the nodes a smaller one chose);
//! - `<topic_prefix>/fleet/halt/<sha256>` (retained): a [`Halt`] — a node that rolled a
//!   bundle back says which and why; no node takes that bundle while the halt stands (an
//!   empty retained message there lifts it). One topic per bundle, so halts never replace
//!   each other.
//!
//! A bundle's identity is the sha256 of its `manifest.toml` ([`bundle_sha`]): the manifest
//! pins every graph by its own sha256 and holds the thresholds, so two bundles that share a
//! graph but not a threshold are different bundles. [`fetch_bundle`] downloads one into the
//! node's `models_dir`, every file checked against the folder's `SHA256SUMS`, and the sizes
//! it takes from the store bounded.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use object_store::ObjectStore;
use object_store::path::Path as Key;
use serde::{Deserialize, Serialize};

use crate::durable::write_atomic;
use crate::infer::bundle::sha256_hex;

/// The topic level under the prefix that holds the fleet's messages (so no node may be
/// called this).
pub const FLEET_LEVEL: &str = "fleet";

/// The retained rollout topic under `topic_prefix`.
pub fn model_topic(topic_prefix: &str) -> String {
    format!("{topic_prefix}/{FLEET_LEVEL}/model")
}

/// The retained halt topic of bundle `sha256` under `topic_prefix`.
pub fn halt_topic(topic_prefix: &str, sha256: &str) -> String {
    format!("{topic_prefix}/{FLEET_LEVEL}/halt/{sha256}")
}

/// What a node subscribes to, halts first: a broker sends the retained messages of one
/// subscription before the next, so a node knows the halts before it sees the rollout.
pub fn filters(topic_prefix: &str) -> Vec<String> {
    vec![format!("{topic_prefix}/{FLEET_LEVEL}/halt/+"), model_topic(topic_prefix)]
}

/// The bundle a halt topic names (`None` for other topics).
pub fn halted_sha<'a>(topic_prefix: &str, topic: &'a str) -> Option<&'a str> {
    let rest = topic.strip_prefix(topic_prefix)?.strip_prefix('/')?.strip_prefix(FLEET_LEVEL)?;
    rest.strip_prefix("/halt/").filter(|sha| is_sha256(sha))
}

/// Which nodes take a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// `"all"`.
    All(String),
    /// Node ids.
    Nodes(Vec<String>),
    /// `{"percent": N}`: a canary of about N % of the nodes.
    Share { percent: u8 },
}

impl Targets {
    /// `"all"`, `a,b,c` or `25%` (the `fleet rollout --nodes` syntax).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "all" {
            return Ok(Self::All(text.into()));
        }
        if let Some(percent) = text.strip_suffix('%') {
            return match percent.parse::<u8>() {
                Ok(percent) if percent <= 100 => Ok(Self::Share { percent }),
                _ => Err(format!("{text:?}: a percentage is 0% to 100%")),
            };
        }
        let nodes: Vec<String> = text.split(',').map(|n| n.trim().to_string()).collect();
        if nodes.iter().any(|n| !safe_name(n)) {
            return Err(format!("{text:?}: expected all, N% or node ids separated by commas"));
        }
        Ok(Self::Nodes(nodes))
    }
}

/// The retained `<topic_prefix>/fleet/model` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub name: String,
    pub version: String,
    /// The folder holding the bundle's files and `SHA256SUMS`: `s3://<bucket>/<key prefix>/`.
    pub url: String,
    /// sha256 of the bundle's `manifest.toml`.
    pub sha256: String,
    pub nodes: Targets,
}

/// The retained `<topic_prefix>/fleet/halt/<sha256>` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Halt {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// The node that rolled it back, and why.
    pub node: String,
    pub reason: String,
    pub at: String,
}

/// A bundle or node name: letters, digits, `.`, `_`, `-`, not starting with `.`, ≤ 128.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn is_sha256(hex: &str) -> bool {
    hex.len() == 64 && hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

impl Rollout {
    /// The message in `payload`, checked: safe names, an `s3://` folder, a sha256, a
    /// percentage ≤ 100.
    pub fn parse(payload: &[u8]) -> Result<Self, String> {
        let rollout: Self = serde_json::from_slice(payload).map_err(|e| format!("not a rollout message: {e}"))?;
        if !safe_name(&rollout.name) || !safe_name(&rollout.version) {
            return Err(format!(
                "name {:?} / version {:?}: letters, digits, . _ - only",
                rollout.name, rollout.version
            ));
        }
        if !rollout.url.starts_with("s3://") {
            return Err(format!("url {:?}: expected s3://<bucket>/<folder>/", rollout.url));
        }
        if !is_sha256(&rollout.sha256) {
            return Err(format!("sha256 {:?}: expected 64 lowercase hex digits", rollout.sha256));
        }
        match &rollout.nodes {
            Targets::All(word) if word != "all" => {
                Err(format!("nodes {word:?}: expected \"all\", a list or a percent"))
            }
            Targets::Share { percent } if *percent > 100 => Err(format!("nodes: {percent} % is over 100")),
            Targets::Nodes(nodes) if nodes.iter().any(|n| !safe_name(n)) => Err("nodes: not node ids".into()),
            _ => Ok(rollout),
        }
    }

    /// Whether `node` takes this rollout.
    pub fn includes(&self, node: &str) -> bool {
        match &self.nodes {
            Targets::All(_) => true,
            Targets::Nodes(nodes) => nodes.iter().any(|n| n == node),
            Targets::Share { percent } => bucket_of(node, &self.sha256) < u32::from(*percent),
        }
    }

    /// Where a node keeps the bundle: `<models_dir>/<name>-<version>`.
    pub fn bundle_dir(&self, models_dir: &Path) -> PathBuf {
        models_dir.join(format!("{}-{}", self.name, self.version))
    }
}

/// A node's place (0–99) for a percentage rollout of bundle `sha256`: stable for the
/// bundle, different between bundles (the same nodes are not always the canaries).
fn bucket_of(node: &str, sha256: &str) -> u32 {
    let digest = sha256_hex(format!("{sha256}/{node}").as_bytes());
    u32::from_str_radix(&digest[..8], 16).expect("hex") % 100
}

/// A bundle's identity: the sha256 of its `manifest.toml`.
pub fn bundle_sha(bundle: &Path) -> std::io::Result<String> {
    Ok(sha256_hex(&std::fs::read(bundle.join(crate::model::manifest::MANIFEST_FILE))?))
}

/// The most files a published bundle folder may list.
const MAX_FILES: usize = 64;
/// The largest file a download takes (a graph of a large UNet is tens of MB).
const MAX_FILE_BYTES: u64 = 2 << 30;
/// The largest `SHA256SUMS`.
const MAX_SUMS_BYTES: u64 = 64 << 10;

/// `SHA256SUMS` as (sha256, file name), every name a plain file name.
fn parse_sums(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut sums = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Some((sha, name)) = line.split_once("  ") else { bail!("SHA256SUMS: not `<sha256>  <file>`: {line:?}") };
        if !is_sha256(sha) || !safe_name(name) {
            bail!("SHA256SUMS: not `<sha256>  <file>`: {line:?}");
        }
        sums.push((sha.to_string(), name.to_string()));
    }
    if sums.len() > MAX_FILES {
        bail!("SHA256SUMS lists {} files; a bundle has at most {MAX_FILES}", sums.len());
    }
    Ok(sums)
}

/// One object, refused unread if it is over `limit` bytes.
async fn get_bounded(store: &dyn ObjectStore, key: &Key, limit: u64) -> anyhow::Result<bytes::Bytes> {
    let result = store.get(key).await.with_context(|| format!("{key}: cannot fetch"))?;
    if result.meta.size > limit {
        bail!("{key}: {} bytes, over the {limit} a bundle file may have", result.meta.size);
    }
    result.bytes().await.with_context(|| format!("{key}: cannot fetch"))
}

/// Fetches and checks every file of `sums` from `folder` into `dir`.
async fn fetch_files(
    store: &dyn ObjectStore,
    folder: &Key,
    sums: &[(String, String)],
    dir: &Path,
) -> anyhow::Result<()> {
    for (sha, name) in sums {
        let bytes = get_bounded(store, &folder.child(name.as_str()), MAX_FILE_BYTES).await?;
        let actual = sha256_hex(&bytes);
        if actual != *sha {
            bail!("{folder}/{name}: sha256 is {actual}, SHA256SUMS says {sha}");
        }
        write_atomic(&dir.join(name), &bytes)?;
    }
    Ok(())
}

/// Downloads the bundle in `folder` into `dest`, unless `dest` already holds the bundle
/// `sha256`: every file listed in `SHA256SUMS` is fetched and checked, the manifest's sha256
/// must be `sha256`, and the files land in a temporary directory beside `dest` that is
/// renamed to it once complete — `dest` is the whole bundle or absent.
pub async fn fetch_bundle(store: &dyn ObjectStore, folder: &Key, sha256: &str, dest: &Path) -> anyhow::Result<()> {
    if dest.exists() {
        return match bundle_sha(dest) {
            Ok(sha) if sha == sha256 => Ok(()),
            _ => bail!("{}: exists and holds another bundle than {sha256}", dest.display()),
        };
    }
    let sums = get_bounded(store, &folder.child("SHA256SUMS"), MAX_SUMS_BYTES).await?;
    let sums = parse_sums(std::str::from_utf8(&sums).context("SHA256SUMS is not UTF-8")?)?;
    let manifest = crate::model::manifest::MANIFEST_FILE;
    if !sums.iter().any(|(sha, name)| name == manifest && sha == sha256) {
        bail!("{folder}: SHA256SUMS has no {manifest} with sha256 {sha256}: another bundle than the rollout names");
    }
    let parent = dest.parent().context("a bundle directory has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    // By hand, not `tempfile`: the directory is renamed into place, never deleted on drop,
    // and only a failed fetch removes it.
    let tmp = parent.join(format!(".fetch-{}-{}", std::process::id(), sha256));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let fetched = fetch_files(store, folder, &sums, &tmp).await;
    let moved = fetched.and_then(|()| {
        std::fs::rename(&tmp, dest).with_context(|| format!("{}: cannot move the bundle in", dest.display()))
    });
    if moved.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    moved?;
    std::fs::File::open(parent)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(nodes: &str) -> Vec<u8> {
        format!(
            r#"{{"name":"brick","version":"2","url":"s3://m/brick/2/","sha256":"{}","nodes":{nodes}}}"#,
            "a".repeat(64)
        )
        .into_bytes()
    }

    #[test]
    fn a_rollout_names_its_nodes_as_all_a_list_or_a_stable_percentage() {
        assert!(Rollout::parse(&rollout("\"all\"")).unwrap().includes("anything"));
        let listed = Rollout::parse(&rollout(r#"["line1","line3"]"#)).unwrap();
        assert!(listed.includes("line1") && !listed.includes("line2"));
        let nodes: Vec<String> = (0..1000).map(|i| format!("node{i}")).collect();
        let share = |p: u8| {
            let r = Rollout::parse(&rollout(&format!(r#"{{"percent":{p}}}"#))).unwrap();
            nodes.iter().filter(|n| r.includes(n)).cloned().collect::<Vec<_>>()
        };
        let (ten, fifty) = (share(10), share(50));
        assert!((60..=140).contains(&ten.len()) && (420..=580).contains(&fifty.len()), "{} {}", ten.len(), fifty.len());
        assert!(ten.iter().all(|n| fifty.contains(n)), "widening keeps the canaries");
        assert!(share(0).is_empty() && share(100).len() == 1000);
        for bad in ["\"some\"", r#"{"percent":101}"#, r#"["../x"]"#] {
            assert!(Rollout::parse(&rollout(bad)).is_err(), "{bad}");
        }
        let text = String::from_utf8(rollout("\"all\"")).unwrap();
        for bad in
            [text.replace("s3://", "http://"), text.replace(&"a".repeat(64), "abc"), text.replace("brick", "../b")]
        {
            assert!(Rollout::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(Targets::parse("25%"), Ok(Targets::Share { percent: 25 }));
        assert_eq!(Targets::parse("a,b"), Ok(Targets::Nodes(vec!["a".into(), "b".into()])));
        assert!(Targets::parse("200%").is_err() && Targets::parse("a,../b").is_err());
    }

    /// A bundle folder as `retrain --publish` leaves it, in an in-memory store.
    fn published(files: &[(&str, &[u8])]) -> (object_store::memory::InMemory, String) {
        let store = object_store::memory::InMemory::new();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut sums = String::new();
        for (name, bytes) in files {
            sums += &format!("{}  {name}\n", sha256_hex(bytes));
            runtime.block_on(store.put(&Key::from(format!("m/b/1/{name}")), bytes.to_vec().into())).unwrap();
        }
        runtime.block_on(store.put(&Key::from("m/b/1/SHA256SUMS"), sums.into_bytes().into())).unwrap();
        (store, sha256_hex(files[0].1))
    }

    #[test]
    fn a_fetched_bundle_is_complete_and_checked_or_absent() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (store, sha) = published(&[("manifest.toml", b"name = 'b'"), ("model.onnx", b"graph")]);
        let dest = dir.path().join("b-1");
        runtime.block_on(fetch_bundle(&store, &Key::from("m/b/1"), &sha, &dest)).unwrap();
        assert_eq!(std::fs::read(dest.join("model.onnx")).unwrap(), b"graph");
        assert_eq!(bundle_sha(&dest).unwrap(), sha);
        // There already: nothing fetched; another bundle under the same name is refused.
        runtime.block_on(fetch_bundle(&store, &Key::from("m/b/1"), &sha, &dest)).unwrap();
        let other = runtime.block_on(fetch_bundle(&store, &Key::from("m/b/1"), &"c".repeat(64), &dest));
        assert!(other.unwrap_err().to_string().contains("another bundle"));
        // A file changed after publishing: refused, and nothing is left behind.
        runtime.block_on(store.put(&Key::from("m/b/1/model.onnx"), b"tampered".to_vec().into())).unwrap();
        let tampered = dir.path().join("b-1-again");
        let error = runtime.block_on(fetch_bundle(&store, &Key::from("m/b/1"), &sha, &tampered)).unwrap_err();
        assert!(error.to_string().contains("sha256 is"), "{error}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the first bundle: {error}");
        // A manifest other than the rollout's: refused before anything is fetched.
        let wrong = runtime.block_on(fetch_bundle(&store, &Key::from("m/b/1"), &"d".repeat(64), &tampered));
        assert!(wrong.unwrap_err().to_string().contains("another bundle than the rollout names"));
    }

    #[test]
    fn checksum_lists_name_plain_files_only() {
        let sha = "b".repeat(64);
        assert_eq!(parse_sums(&format!("{sha}  model.onnx\n")).unwrap(), [(sha.clone(), "model.onnx".into())]);
        for bad in [format!("{sha}  ../etc/passwd"), format!("{sha} model.onnx"), "xyz  model.onnx".into()] {
            assert!(parse_sums(&bad).is_err(), "{bad}");
        }
    }
}

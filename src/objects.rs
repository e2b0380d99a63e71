//! Object storage for the offline commands: `retrain` and `eval` take `--data
//! s3://<bucket>/<prefix>` (capture stores that nodes uploaded, `daemon::upload`), and
//! `retrain --publish s3://<bucket>/<prefix>` puts the bundle it wrote under
//! `<prefix>/<name>/<version>/` with its files' sha256 — so training runs on a GPU host
//! that no node needs to reach. The connection comes from the standard AWS variables
//! (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint), read by `object_store`.
//!
//! Uploaded keys are `<prefix>/<node>/<camera>/<day>/<class>/<file>`; they are mirrored into
//! a local capture store `<cache>/<node>.<camera>/<class>/<file>` (one camera directory per
//! node and camera), where a file already there with the same size is not fetched again.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use futures_util::TryStreamExt;
use object_store::ObjectStore;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;

use crate::capture::STORE_MARKER;
use crate::durable::write_atomic;
use crate::infer::bundle::sha256_hex;

/// Where mirrors of object storage are kept: `$EDGE_INSPECT_CACHE`, else
/// `$XDG_CACHE_HOME/edge-inspect/objects`, else `~/.cache/edge-inspect/objects`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("EDGE_INSPECT_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("edge-inspect/objects")
}

/// Whether `path` names object storage (`s3://…`) rather than a local directory.
pub fn is_remote(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.starts_with("s3://"))
}

/// The bucket of an `s3://<bucket>/<prefix>` URL and the key prefix within it.
pub fn split_url(url: &str) -> anyhow::Result<(&str, Key)> {
    let rest = url.strip_prefix("s3://").with_context(|| format!("{url}: not an s3:// URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        bail!("{url}: no bucket");
    }
    Ok((bucket, Key::parse(prefix.trim_matches('/')).with_context(|| format!("{url}: not a key prefix"))?))
}

/// The client for `url`'s bucket (from the AWS variables) and the key prefix within it.
pub fn client(url: &str) -> anyhow::Result<(AmazonS3, Key)> {
    let (bucket, prefix) = split_url(url)?;
    let client = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .build()
        .with_context(|| format!("{url}: cannot set up the object store client (AWS_* variables)"))?;
    Ok((client, prefix))
}

/// A client for `bucket` on a node: the connection from its config (`[upload]`), not the
/// environment; no retries of its own (the callers back off, and shutdown cuts that short).
pub fn configured_client(
    connection: &crate::config::UploadConfig,
    bucket: &str,
    timeout: std::time::Duration,
) -> object_store::Result<AmazonS3> {
    // `allow_http` belongs to the client options: the builder's own setter would be
    // replaced by them.
    let options = object_store::ClientOptions::new()
        .with_timeout(timeout)
        .with_connect_timeout(std::time::Duration::from_secs(10))
        .with_allow_http(connection.endpoint.starts_with("http://"));
    let retry = object_store::RetryConfig { max_retries: 0, ..Default::default() };
    let builder = AmazonS3Builder::new()
        .with_endpoint(&connection.endpoint)
        .with_bucket_name(bucket)
        .with_region(&connection.region)
        .with_virtual_hosted_style_request(false)
        .with_client_options(options)
        .with_retry(retry);
    match &connection.credentials {
        Some((id, secret)) => builder.with_access_key_id(id).with_secret_access_key(secret),
        None => builder.with_skip_signature(true),
    }
    .build()
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start a tokio runtime")
}

/// Where an uploaded key goes in the local store: `<node>.<camera>/<class>/<file>` for
/// `<prefix>/<node>/<camera>/<day>/<class>/<file>`; `None` for other keys.
fn local_path(prefix: &Key, key: &Key) -> Option<PathBuf> {
    let parts: Vec<_> = key.prefix_match(prefix)?.map(|p| p.as_ref().to_string()).collect();
    let [node, camera, _day, class, file] = parts.as_slice() else { return None };
    let safe = |s: &str| !s.is_empty() && !s.starts_with('.') && !s.contains(['/', '\\']);
    (safe(node) && safe(camera) && safe(file) && matches!(class.as_str(), "flagged" | "normal"))
        .then(|| PathBuf::from(format!("{node}.{camera}")).join(class).join(file))
}

/// Mirrors the capture stores under `url` into `cache` (a capture store `retrain` and
/// `eval` read); returns how many files were fetched and how many were there already.
pub fn mirror(url: &str, cache: &Path) -> anyhow::Result<(usize, usize)> {
    let (client, prefix) = client(url)?;
    std::fs::create_dir_all(cache).with_context(|| format!("{}: cannot create the cache", cache.display()))?;
    let marker = cache.join(STORE_MARKER);
    if !marker.is_file() {
        write_atomic(&marker, b"# edge-inspect capture store mirrored from object storage\nversion = 1\n")?;
    }
    runtime()?.block_on(async {
        let objects: Vec<_> =
            client.list(Some(&prefix)).try_collect().await.with_context(|| format!("{url}: cannot list"))?;
        let (mut fetched, mut kept) = (0, 0);
        for object in objects {
            let Some(relative) = local_path(&prefix, &object.location) else { continue };
            let path = cache.join(relative);
            if std::fs::metadata(&path).is_ok_and(|m| m.len() == object.size) {
                kept += 1;
                continue;
            }
            let bytes = client.get(&object.location).await?.bytes().await?;
            std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
            write_atomic(&path, &bytes).with_context(|| format!("{}: cannot write", path.display()))?;
            fetched += 1;
        }
        anyhow::Ok((fetched, kept))
    })
}

/// The local store for `data`: itself, or for an `s3://` URL its mirror under `cache_root`
/// (`<cache_root>/<bucket>/<prefix>`), brought up to date first.
pub fn local_data(data: &Path, cache_root: &Path) -> anyhow::Result<PathBuf> {
    if !is_remote(data) {
        return Ok(data.to_path_buf());
    }
    let url = data.to_str().expect("checked to be UTF-8");
    let cache = cache_root.join(url.trim_start_matches("s3://").trim_end_matches('/'));
    let (fetched, kept) = mirror(url, &cache)?;
    tracing::info!(url, cache = %cache.display(), fetched, kept, "Capture stores mirrored from object storage.");
    Ok(cache)
}

/// Puts every file of `bundle` under `<url>/<name>/<version>/` and a `SHA256SUMS` of them;
/// returns the URL of that folder.
pub fn publish(bundle: &Path, url: &str) -> anyhow::Result<String> {
    let manifest_path = bundle.join(crate::model::manifest::MANIFEST_FILE);
    let text =
        std::fs::read_to_string(&manifest_path).with_context(|| format!("{}: cannot read", manifest_path.display()))?;
    let manifest: crate::model::manifest::Manifest =
        toml::from_str(&text).with_context(|| format!("{}: not a manifest", manifest_path.display()))?;
    let (client, prefix) = client(url)?;
    let folder = Key::parse(format!("{prefix}/{}/{}", manifest.name, manifest.version).trim_start_matches('/'))?;
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(bundle)?.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
    files.sort();
    runtime()?.block_on(async {
        let mut sums = String::new();
        for file in &files {
            let name = file.file_name().and_then(|n| n.to_str()).context("a bundle file name is UTF-8")?;
            let bytes = std::fs::read(file).with_context(|| format!("{}: cannot read", file.display()))?;
            sums += &format!("{}  {name}\n", sha256_hex(&bytes));
            client.put(&folder.child(name), bytes.into()).await.with_context(|| format!("{url}: cannot put {name}"))?;
        }
        client.put(&folder.child("SHA256SUMS"), sums.into_bytes().into()).await?;
        anyhow::Ok(())
    })?;
    let bucket = url.trim_start_matches("s3://").split('/').next().unwrap_or_default();
    Ok(format!("s3://{bucket}/{folder}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploaded_keys_land_in_a_capture_store_layout_and_nothing_else_does() {
        let prefix = Key::from("plant-a");
        let key = |k: &str| Key::parse(k).unwrap();
        assert_eq!(
            local_path(&prefix, &key("plant-a/line3/cam0/2026-12-04/flagged/1-000001.png")),
            Some(PathBuf::from("line3.cam0/flagged/1-000001.png"))
        );
        for other in ["plant-a/line3/cam0/flagged/1.png", "plant-b/l/c/d/flagged/1.png", "plant-a/l/c/d/models/1.png"] {
            assert_eq!(local_path(&prefix, &key(other)), None, "{other}");
        }
        assert!(is_remote(Path::new("s3://bucket/p")) && !is_remote(Path::new("data/brick")));
    }
}

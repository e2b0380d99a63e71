//! `edge-inspect fleet`: the operator's side of the rollout protocol (`crate::fleet`) —
//! publish a bundle to object storage, publish the retained rollout for it, and read the
//! fleet's state back from the broker.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use object_store::ObjectStore;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{Client, Connection, Event, MqttOptions};

use crate::cli::{BrokerArgs, FleetAction, FleetArgs};
use crate::fleet::{Halt, Rollout, Targets, halt_topic, model_topic};
use crate::infer::bundle::sha256_hex;

pub fn run(args: FleetArgs) -> anyhow::Result<()> {
    match args.action {
        FleetAction::Publish { bundle, to } => {
            let url = crate::objects::publish(&bundle, &to)?;
            println!("published {url} sha256 {}", crate::fleet::bundle_sha(&bundle)?);
            Ok(())
        }
        FleetAction::Rollout { url, nodes, force, broker } => rollout(&url, &nodes, force, &broker),
        FleetAction::Status { broker, group, listen_s, json } => {
            status(&broker, &group, Duration::from_secs(listen_s), json)
        }
    }
}

/// How long a broker may take to answer (connect, subscribe, acknowledge).
const ANSWER: Duration = Duration::from_secs(10);
/// Retained messages follow a SUBACK; this long without one means there is none.
const RETAINED_GRACE: Duration = Duration::from_secs(1);

/// A connection to the fleet's broker for one command.
fn connect(broker: &BrokerArgs) -> (Client, Connection) {
    let id = format!("edge-inspect-fleet-{}", std::process::id());
    let mut options = MqttOptions::new(id, &broker.host, broker.port);
    options.set_keep_alive(Duration::from_secs(30));
    Client::new(options, 16)
}

/// Drives `connection` until `done` says so after an event, or `until` passes (`Ok(false)`).
fn drive(connection: &mut Connection, until: Instant, mut done: impl FnMut(&Event) -> bool) -> anyhow::Result<bool> {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        match connection.recv_timeout(left) {
            Ok(Ok(event)) if done(&event) => return Ok(true),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("MQTT: {e}"),
            Err(_) => return Ok(false),
        }
    }
}

/// The rollout message for the bundle in `url`: its manifest read from the store.
fn message_for(url: &str, nodes: &str) -> anyhow::Result<Rollout> {
    let nodes = Targets::parse(nodes).map_err(anyhow::Error::msg)?;
    let (store, folder) = crate::objects::client(url)?;
    let key = folder.child(crate::model::manifest::MANIFEST_FILE);
    let bytes = crate::objects::runtime()?.block_on(async {
        let result = store.get(&key).await.with_context(|| format!("{url}: no manifest.toml"))?;
        anyhow::Ok(result.bytes().await?)
    })?;
    let manifest: crate::model::manifest::Manifest =
        toml::from_str(std::str::from_utf8(&bytes)?).with_context(|| format!("{url}: not a manifest"))?;
    let url = format!("{}/", url.trim_end_matches('/'));
    let rollout = Rollout { name: manifest.name, version: manifest.version, url, sha256: sha256_hex(&bytes), nodes };
    Rollout::parse(&serde_json::to_vec(&rollout)?).map_err(anyhow::Error::msg)
}

/// Publishes the retained rollout, unless a halt on its bundle stands (`force` lifts it).
fn rollout(url: &str, nodes: &str, force: bool, broker: &BrokerArgs) -> anyhow::Result<()> {
    let rollout = message_for(url, nodes)?;
    let (client, mut connection) = connect(broker);
    let halt = halt_topic(&broker.topic_prefix, &rollout.sha256);
    client.subscribe(&halt, QoS::AtLeastOnce)?;
    let subscribed =
        drive(&mut connection, Instant::now() + ANSWER, |e| matches!(e, Event::Incoming(Packet::SubAck(_))))?;
    if !subscribed {
        bail!("{}:{}: the broker did not answer", broker.host, broker.port);
    }
    let mut standing: Option<Halt> = None;
    drive(&mut connection, Instant::now() + RETAINED_GRACE, |e| match e {
        Event::Incoming(Packet::Publish(p)) if !p.payload.is_empty() => {
            standing = serde_json::from_slice(&p.payload).ok();
            true
        }
        _ => false,
    })?;
    if let Some(h) = &standing {
        if !force {
            bail!(
                "{} {} is halted: {} rolled it back ({}); --force lifts the halt",
                h.name,
                h.version,
                h.node,
                h.reason
            );
        }
        client.publish(&halt, QoS::AtLeastOnce, true, Vec::new())?;
    }
    client.publish(model_topic(&broker.topic_prefix), QoS::AtLeastOnce, true, serde_json::to_vec(&rollout)?)?;
    let acks = if standing.is_some() { 2 } else { 1 };
    let mut acked = 0;
    let all = drive(&mut connection, Instant::now() + ANSWER, |e| {
        acked += usize::from(matches!(e, Event::Incoming(Packet::PubAck(_))));
        acked == acks
    })?;
    if !all {
        bail!("{}:{}: the broker did not acknowledge the rollout", broker.host, broker.port);
    }
    let _ = client.disconnect();
    println!("{}", serde_json::to_string(&rollout)?);
    Ok(())
}

/// One node as the broker knows it.
#[derive(Debug, Default, serde::Serialize)]
struct Node {
    available: Option<String>,
    model: Option<serde_json::Value>,
    rollout: Option<serde_json::Value>,
    /// Frames inspected and alerts over the listening window, from two `stats` messages.
    frames: Option<u64>,
    alerts: Option<u64>,
    #[serde(skip)]
    first_stats: Option<(u64, u64)>,
}

/// Frames processed and alerts in a `stats` payload, summed over its cameras.
fn counts(stats: &serde_json::Value) -> (u64, u64) {
    let cameras = stats["cameras"].as_object().into_iter().flat_map(|c| c.values());
    cameras
        .fold((0, 0), |(f, a), c| (f + c["processed"].as_u64().unwrap_or(0), a + c["anomalies"].as_u64().unwrap_or(0)))
}

/// Reads the retained states (plain subscriptions: a shared one gets no retained
/// messages) and listens to the stats stream through `$share/<group>/…` for `listen`.
fn status(broker: &BrokerArgs, group: &str, listen: Duration, json: bool) -> anyhow::Result<()> {
    let prefix = &broker.topic_prefix;
    let (client, mut connection) = connect(broker);
    for state in ["available", "model", "rollout"] {
        client.subscribe(format!("{prefix}/+/{state}"), QoS::AtLeastOnce)?;
    }
    client.subscribe(format!("$share/{group}/{prefix}/+/stats"), QoS::AtMostOnce)?;
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    drive(&mut connection, Instant::now() + listen, |event| {
        let Event::Incoming(Packet::Publish(p)) = event else { return false };
        let topic = String::from_utf8_lossy(&p.topic);
        let Some((node, what)) = topic.strip_prefix(&format!("{prefix}/")).and_then(|t| t.split_once('/')) else {
            return false;
        };
        let entry = nodes.entry(node.to_string()).or_default();
        let value = serde_json::from_slice::<serde_json::Value>(&p.payload).ok();
        match what {
            "available" => entry.available = Some(String::from_utf8_lossy(&p.payload).into_owned()),
            "model" => entry.model = value,
            "rollout" => entry.rollout = value,
            "stats" => {
                let now = counts(&value.unwrap_or_default());
                let first = *entry.first_stats.get_or_insert(now);
                (entry.frames, entry.alerts) =
                    (Some(now.0.saturating_sub(first.0)), Some(now.1.saturating_sub(first.1)));
            }
            _ => {}
        }
        false
    })?;
    let _ = client.disconnect();
    nodes.retain(|name, _| name != "fleet");
    for (name, node) in &nodes {
        if json {
            println!("{}", serde_json::json!({ "node": name, "state": node }));
        } else {
            let field = |v: &Option<serde_json::Value>, key: &str| {
                v.as_ref().and_then(|v| v[key].as_str().map(str::to_string)).unwrap_or_else(|| "-".into())
            };
            let (model, rollout) = (&node.model, &node.rollout);
            println!(
                "{name}\t{}\t{} {}\t{} {} {}\tframes {} alerts {}",
                node.available.as_deref().unwrap_or("-"),
                field(model, "name"),
                field(model, "version"),
                field(rollout, "status"),
                field(rollout, "name"),
                field(rollout, "version"),
                node.frames.map_or("-".into(), |f| f.to_string()),
                node.alerts.map_or("-".into(), |a| a.to_string()),
            );
        }
    }
    Ok(())
}

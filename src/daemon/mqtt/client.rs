//! The MQTT side: connection options (Last Will, credentials, TLS, packet size), the
//! connection thread (reconnect with backoff, re-publish retained state on every connect),
//! and non-blocking publishing.
//!
//! Retained topics are remembered in a [`RetainedState`] so that a reconnect — or a
//! broker that lost its store — gets the latest `status`, `state` and `snapshot` of every
//! camera and then `available = online`, in that order (dashboards see state before the
//! node claims to be up). Publishing never blocks the pipeline. Alerts and masks are
//! durable: while disconnected, behind an outbox that is not empty, or when the client
//! queue is full they go to the on-disk [`Outbox`], which the connection thread empties
//! after `online` and the retained state, in order. Other messages are not queued while
//! disconnected (retained ones are re-sent on connect; `stats` is superseded).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rumqttc::{Client, Connection, Event, LastWill, MqttOptions, Packet, QoS, Transport};

use super::outbox::Outbox;
use crate::backoff::{Backoff, pause};
use crate::config::{MqttConfig, TlsConfig};
use crate::stats::PipelineStats;

/// Latest payload of each retained topic, re-published on every connect.
#[derive(Default)]
pub struct RetainedState {
    topics: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Set (under the outbox lock) when `go_offline` has queued the DISCONNECT: nothing may
    /// be taken from the outbox after that, it would be queued behind the DISCONNECT and
    /// lost; it stays on disk for the next run instead.
    closing: std::sync::atomic::AtomicBool,
}

/// Requests queued in the client before publishing counts as a backlog drop.
const CLIENT_QUEUE: usize = 64;

pub struct Mqtt {
    client: Client,
    pub base: String,
    retained: Arc<RetainedState>,
    outbox: Arc<Mutex<Outbox>>,
    stats: Arc<PipelineStats>,
}

#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error("{path}: {what}")]
    Tls { path: String, what: String },
    #[error("{path}: cannot open the MQTT outbox: {source}")]
    Outbox { path: String, source: std::io::Error },
}

fn tls_transport(tls: &TlsConfig) -> Result<Transport, MqttSetupError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let fail = |path: &std::path::Path, what: String| MqttSetupError::Tls { path: path.display().to_string(), what };
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(ca) => {
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| fail(ca, e.to_string()))? {
                roots.add(cert.map_err(|e| fail(ca, e.to_string()))?).map_err(|e| fail(ca, e.to_string()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(std::path::Path::new("(tls)"), e.to_string()))?
        .with_root_certificates(roots);
    let config = match &tls.client_auth {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| fail(cert, e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| fail(cert, e.to_string()))?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| fail(key, e.to_string()))?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| fail(key, e.to_string()))?
        }
    };
    Ok(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(config))))
}

/// Client options from the config: Last Will `available = offline` (retained, QoS 1).
pub fn options(config: &MqttConfig) -> Result<MqttOptions, MqttSetupError> {
    let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
    options.set_keep_alive(config.keep_alive);
    options.set_max_packet_size(config.max_packet_bytes, config.max_packet_bytes);
    options.set_clean_session(true);
    options.set_last_will(LastWill::new(format!("{}/available", config.base_topic), "offline", QoS::AtLeastOnce, true));
    if let Some((user, password)) = &config.credentials {
        options.set_credentials(user, password);
    }
    if let Some(tls) = &config.tls {
        options.set_transport(tls_transport(tls)?);
    }
    Ok(options)
}

impl Mqtt {
    /// Creates the client and the link that drives its connection (run it on a thread of
    /// its own: [`MqttLink::run`]). See [`Subscriptions`] for what it listens to.
    pub fn start(
        config: &MqttConfig,
        stats: Arc<PipelineStats>,
        subscriptions: Subscriptions,
    ) -> Result<(Self, MqttLink), MqttSetupError> {
        let (client, connection) = Client::new(options(config)?, CLIENT_QUEUE);
        let retained = Arc::new(RetainedState::default());
        let outbox = Outbox::open(&config.outbox_dir, config.outbox_max_bytes, config.outbox_max_age, stats.clone())
            .map_err(|source| MqttSetupError::Outbox { path: config.outbox_dir.display().to_string(), source })?;
        let outbox = Arc::new(Mutex::new(outbox));
        let mqtt = Self {
            client: client.clone(),
            base: config.base_topic.clone(),
            retained: retained.clone(),
            outbox: outbox.clone(),
            stats: stats.clone(),
        };
        let link = Link { client, base: config.base_topic.clone(), retained, outbox, stats, subscriptions };
        Ok((mqtt, MqttLink { link, connection, reconnect_max: config.reconnect_max }))
    }

    pub fn topic(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.base)
    }

    /// Publishes without blocking; `false` when the message was not handed to the client
    /// (disconnected, or its queue full). A retained message is remembered either way and
    /// re-sent on every connect.
    pub fn publish(&self, suffix: &str, qos: QoS, retain: bool, payload: Vec<u8>) -> bool {
        self.publish_at(self.topic(suffix), qos, retain, payload)
    }

    /// [`Mqtt::publish`] to a topic outside the node's own (Home Assistant discovery).
    pub fn publish_at(&self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>) -> bool {
        if retain {
            self.retained.topics.lock().expect("retained lock").insert(topic.clone(), payload.clone());
        }
        if !self.stats.mqtt_connected.load(Relaxed) {
            return retain;
        }
        self.client.try_publish(topic, qos, retain, payload).is_ok()
    }

    /// Publishes at QoS 1 or, where that cannot happen now, appends to the outbox (JSON
    /// payloads then carry `"delayed": true`). `false` only if the outbox cannot be written.
    pub fn publish_durable(&self, suffix: &str, payload: Vec<u8>) -> bool {
        let topic = self.topic(suffix);
        let mut outbox = self.outbox.lock().expect("outbox lock");
        if self.stats.mqtt_connected.load(Relaxed)
            && !self.retained.closing.load(Relaxed)
            && outbox.is_empty()
            && self.client.try_publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone()).is_ok()
        {
            return true;
        }
        match outbox.push(&topic, false, &mark_delayed(payload)) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(topic = %topic, error = %e, "Cannot write to the MQTT outbox; message lost.");
                false
            }
        }
    }

    /// Waits, at most until `deadline`, for the link to be connected and the outbox empty:
    /// at shutdown, what waited for a broker (or a connect still in progress) goes out before
    /// `offline`. Whatever is left stays on disk for the next run.
    pub fn flush(&self, deadline: Instant) {
        while Instant::now() < deadline {
            let empty = self.outbox.lock().expect("outbox lock").is_empty();
            if empty && self.stats.mqtt_connected.load(Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!("MQTT outbox not delivered before the drain deadline; it waits on disk for the next run.");
    }

    /// Publishes the final retained `offline` states and disconnects cleanly.
    pub fn go_offline(&self, cameras: &[String]) {
        // Under the outbox lock: a drain of the outbox either finished before the DISCONNECT
        // is queued, or sees `closing` and leaves the outbox alone.
        let _outbox = self.outbox.lock().expect("outbox lock");
        for camera in cameras {
            self.publish(&format!("{camera}/status"), QoS::AtLeastOnce, true, b"offline".to_vec());
        }
        self.publish("available", QoS::AtLeastOnce, true, b"offline".to_vec());
        self.retained.closing.store(true, Relaxed);
        let _ = self.client.try_disconnect();
    }
}

/// A JSON object payload gains `"delayed": true`; anything else (a PNG) is kept as is.
fn mark_delayed(payload: Vec<u8>) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(&payload) {
        Ok(serde_json::Value::Object(mut object)) => {
            object.insert("delayed".into(), true.into());
            serde_json::to_vec(&object).expect("a JSON object serialises")
        }
        _ => payload,
    }
}

/// The connection thread's side: the client, what is re-sent on connect, the outbox.
struct Link {
    client: Client,
    base: String,
    retained: Arc<RetainedState>,
    outbox: Arc<Mutex<Outbox>>,
    stats: Arc<PipelineStats>,
    subscriptions: Subscriptions,
}

/// A message that arrived on a command topic.
#[derive(Debug)]
pub struct Incoming {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What the link subscribes to after every connect.
#[derive(Default)]
pub struct Subscriptions {
    /// Home Assistant's `<prefix>/status`: its `online` makes the link announce the retained
    /// state again.
    pub birth: Option<String>,
    /// Command topic filters and where their messages go (a bounded queue: when it is full
    /// a command is dropped and logged, never blocking the connection).
    pub commands: Option<(Vec<String>, crossbeam_channel::Sender<Incoming>)>,
}

/// The connection's driver: reconnects, announces, drains the outbox.
pub struct MqttLink {
    link: Link,
    connection: Connection,
    reconnect_max: Duration,
}

impl MqttLink {
    /// Runs until `stop` closes and the final `offline` has been sent (or 3 s have passed).
    pub fn run(self, stop: Receiver<()>) {
        self.link.run(self.connection, stop, self.reconnect_max)
    }
}

/// Outbox messages handed to the client per event-loop turn.
const OUTBOX_BATCH: usize = 16;

impl Link {
    /// After a connect: the retained state, then `online` (unless stopping).
    fn announce(&self, stopping: bool) {
        let snapshot: Vec<(String, Vec<u8>)> =
            self.retained.topics.lock().expect("retained lock").iter().map(|(t, p)| (t.clone(), p.clone())).collect();
        let available = format!("{}/available", self.base);
        for (topic, payload) in snapshot.into_iter().filter(|(t, _)| *t != available) {
            let _ = self.client.try_publish(topic, QoS::AtLeastOnce, true, payload);
        }
        if !stopping {
            let _ = self.client.try_publish(available, QoS::AtLeastOnce, true, "online");
        }
    }

    /// Home Assistant's birth message, or a command for the control thread.
    fn incoming(&self, p: rumqttc::Publish, stopping: bool) {
        if self.subscriptions.birth.as_deref() == Some(p.topic.as_str()) {
            if &p.payload[..] == b"online" {
                // Home Assistant (re)started: it needs the discovery configs and the state again.
                tracing::info!(topic = %p.topic, "Home Assistant is online; announcing again.");
                self.announce(stopping);
            }
        } else if let Some((_, commands)) = &self.subscriptions.commands
            && commands.try_send(Incoming { topic: p.topic.clone(), payload: p.payload.to_vec() }).is_err()
        {
            tracing::warn!(topic = %p.topic, "Command queue full; command dropped.");
        }
    }

    /// Hands the oldest outbox messages to the client while it takes them.
    fn drain_outbox(&self) {
        let mut outbox = self.outbox.lock().expect("outbox lock");
        if self.retained.closing.load(Relaxed) {
            return;
        }
        for _ in 0..OUTBOX_BATCH {
            let Some(message) = outbox.front() else { break };
            if self.client.try_publish(message.topic, QoS::AtLeastOnce, message.retain, message.payload).is_err() {
                break;
            }
            outbox.pop_front();
        }
    }

    fn run(self, mut connection: Connection, stop: Receiver<()>, reconnect_max: Duration) {
        let stats = self.stats.clone();
        let mut backoff = Backoff::new(Duration::from_millis(250), reconnect_max);
        let mut stopping_since: Option<Instant> = None;
        loop {
            if stopping_since.is_none() && !pause(&stop, Duration::ZERO) {
                stopping_since = Some(Instant::now());
            }
            // After shutdown the owner publishes `offline` and disconnects; give that 3 s.
            if stopping_since.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
                tracing::warn!("MQTT disconnect did not complete in time.");
                break;
            }
            // A blocking poll: a timeout around it would cancel a connect still in progress (a
            // broker 150 ms away never got connected, and every cancelled attempt left a Last
            // Will on it). Shutdown still gets through: `go_offline` queues requests that wake
            // the poll, and a failing connect returns within rumqttc's connection timeout.
            match connection.recv() {
                Err(rumqttc::RecvError) => break,
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    backoff.reset();
                    stats.mqtt_connects.fetch_add(1, Relaxed);
                    stats.mqtt_connected.store(true, Relaxed);
                    tracing::info!(code = ?ack.code, "MQTT connected.");
                    let commands = self.subscriptions.commands.iter().flat_map(|(filters, _)| filters.iter());
                    for filter in self.subscriptions.birth.iter().chain(commands) {
                        let _ = self.client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    self.announce(stopping_since.is_some());
                    self.drain_outbox();
                }
                // Home Assistant (re)started: it needs the discovery configs and the state again.
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => self.incoming(p, stopping_since.is_some()),
                Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) => {
                    tracing::info!("MQTT disconnected cleanly.");
                    // Let the DISCONNECT reach the socket before the event loop is dropped.
                    let _ = connection.recv_timeout(Duration::from_millis(100));
                    break;
                }
                Ok(Ok(_)) => {
                    if stats.mqtt_connected.load(Relaxed) {
                        self.drain_outbox();
                    }
                }
                Ok(Err(e)) => {
                    stats.mqtt_connected.store(false, Relaxed);
                    stats.mqtt_failures.fetch_add(1, Relaxed);
                    if stopping_since.is_some() {
                        break;
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT connection failed.");
                    if !pause(&stop, delay) {
                        stopping_since = Some(Instant::now());
                    }
                }
            }
        }
        stats.mqtt_connected.store(false, Relaxed);
    }
}

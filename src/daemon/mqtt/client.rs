//! The MQTT side: connection options (Last Will, credentials, TLS, packet sizes, a
//! persistent session), the connection thread (reconnect with backoff, re-publish retained
//! state on every connect), and non-blocking publishing.
//!
//! The client speaks MQTT 5: its CONNECT states the largest packet the node accepts
//! ([`MAX_INCOMING_PACKET`]), so a broker never sends it a message it would have to refuse
//! (a huge retained command would otherwise drop the connection on every subscribe), and
//! it asks for a session that outlives a reconnect (`session_expiry_s`).
//!
//! Retained topics are remembered in a [`RetainedState`] so that a reconnect — or a
//! broker that lost its store — gets the latest `status`, `state` and `snapshot` of every
//! camera and then `available = online`, in that order (dashboards see state before the
//! node claims to be up). Publishing never blocks the pipeline. Alerts, masks and events
//! are durable: each is written to the on-disk [`Outbox`] first, handed to the client when
//! it can take it, and deleted only on its PUBACK ([`Handoff`] maps packet ids to outbox
//! entries); a connection lost before the PUBACK sends it again. Other messages are not
//! queued while disconnected (retained ones are re-sent on connect; `stats` is superseded).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnAck, LastWill, Packet, PubAck, PubAckReason};
use rumqttc::v5::{Client, Connection, ConnectionError, Event, MqttOptions, Request, StateError};
use rumqttc::{Outgoing, Transport};

use super::handoff::{Handoff, Tag};
use super::outbox::Outbox;
use crate::backoff::{Backoff, pause};
use crate::config::{MqttConfig, TlsConfig};
use crate::stats::{LogThrottle, PipelineStats};

/// The largest packet the node accepts from the broker. Commands are at most 4 KiB
/// (`control::MAX_COMMAND_BYTES`) and Home Assistant's birth message is a word; the broker
/// is told this in CONNECT and must not send anything larger.
pub const MAX_INCOMING_PACKET: u32 = 64 << 10;

/// Bytes a PUBLISH needs beside its topic and payload (fixed header, topic length, packet
/// id, properties), rounded up.
const PUBLISH_OVERHEAD: usize = 16;

/// Latest payload of each retained topic, re-published on every connect.
#[derive(Default)]
pub struct RetainedState {
    topics: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Set (under the outbox lock) when `go_offline` has queued the DISCONNECT: nothing may
    /// be taken from the outbox after that, it would be queued behind the DISCONNECT and
    /// lost; it stays on disk for the next run instead.
    closing: AtomicBool,
}

/// Requests queued in the client before a hand-off waits for the next turn.
const CLIENT_QUEUE: usize = 64;

/// The client and what it holds unacknowledged: every QoS-1 hand-off goes through
/// [`Wire::hand`], so that [`Handoff`]'s order is the client's queue order.
struct Wire {
    client: Client,
    handoff: Mutex<Handoff>,
    /// The largest PUBLISH the broker and the config allow (the broker's CONNACK may lower
    /// the config's `max_packet_bytes`).
    max_packet: AtomicUsize,
    configured_max: usize,
}

/// QoS-0 messages are held back while a QoS-1 publish has waited this long for its PUBACK.
const QOS0_HOLD: Duration = Duration::from_secs(2);

impl Wire {
    /// How long the oldest publish on the wire has waited for its PUBACK (zero if none).
    fn unacknowledged_for(&self) -> Duration {
        self.handoff.lock().expect("handoff lock").oldest_wait(Instant::now()).unwrap_or_default()
    }

    fn fits(&self, topic: &str, payload: usize) -> bool {
        topic.len() + payload + PUBLISH_OVERHEAD <= self.max_packet.load(Relaxed)
    }

    /// Whether a message is over the packet limit; says so in the log (throttled by `log`).
    fn too_large(&self, topic: &str, payload: usize, log: &LogThrottle) -> bool {
        if self.fits(topic, payload) {
            return false;
        }
        if let Some(suppressed) = log.admit() {
            let limit = self.max_packet.load(Relaxed);
            tracing::error!(
                topic,
                bytes = payload,
                limit,
                suppressed,
                "Message larger than the broker takes; not sent."
            );
        }
        true
    }

    /// Hands a publish to the client without blocking; `false` if its queue is full.
    fn hand(&self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>, tag: Tag) -> bool {
        let mut handoff = self.handoff.lock().expect("handoff lock");
        let handed = self.client.try_publish(topic, qos, retain, payload).is_ok();
        if handed && qos != QoS::AtMostOnce {
            handoff.handed(tag);
        }
        handed
    }
}

pub struct Mqtt {
    wire: Arc<Wire>,
    pub base: String,
    retained: Arc<RetainedState>,
    outbox: Arc<Mutex<Outbox>>,
    stats: Arc<PipelineStats>,
    /// One log line per 10 s for messages that cannot be kept or sent (a full disk fails
    /// every message, an oversized mask every frame).
    write_failures: LogThrottle,
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

/// Client options from the config: MQTT 5, Last Will `available = offline` (retained,
/// QoS 1), a session that survives `session_expiry_s` of absence, incoming packets of at
/// most [`MAX_INCOMING_PACKET`].
pub fn options(config: &MqttConfig) -> Result<MqttOptions, MqttSetupError> {
    let (host, port) = broker_address(config);
    let mut options = MqttOptions::new(&config.client_id, host, port);
    options.set_keep_alive(config.keep_alive);
    options.set_max_packet_size(Some(MAX_INCOMING_PACKET));
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(config.session_expiry.as_secs().min(u32::MAX as u64) as u32));
    let will_topic = format!("{}/available", config.base_topic);
    options.set_last_will(LastWill::new(will_topic, "offline", QoS::AtLeastOnce, true, None));
    if let Some((user, password)) = &config.credentials {
        options.set_credentials(user, password);
    }
    if let Some(tls) = &config.tls {
        options.set_transport(tls_transport(tls)?);
    }
    Ok(options)
}

/// The broker to connect to: the config's, or the embedded broker's MQTT 5 listener.
fn broker_address(config: &MqttConfig) -> (String, u16) {
    #[cfg(feature = "embedded-broker")]
    if config.embedded_broker
        && let Some(address) = super::broker::client_address()
    {
        return (address.ip().to_string(), address.port());
    }
    (config.host.clone(), config.port)
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
        let wire = Arc::new(Wire {
            client,
            handoff: Mutex::default(),
            max_packet: AtomicUsize::new(config.max_packet_bytes),
            configured_max: config.max_packet_bytes,
        });
        let retained = Arc::new(RetainedState::default());
        let outbox = Outbox::open(&config.outbox_dir, config.outbox_max_bytes, config.outbox_max_age, stats.clone())
            .map_err(|source| MqttSetupError::Outbox { path: config.outbox_dir.display().to_string(), source })?;
        let outbox = Arc::new(Mutex::new(outbox));
        let mqtt = Self {
            wire: wire.clone(),
            base: config.base_topic.clone(),
            retained: retained.clone(),
            outbox: outbox.clone(),
            stats: stats.clone(),
            write_failures: LogThrottle::new(Duration::from_secs(10)),
        };
        let link = Link {
            wire,
            base: config.base_topic.clone(),
            retained,
            outbox,
            stats,
            subscriptions,
            ack_timeout: config.keep_alive,
            warnings: LogThrottle::new(Duration::from_secs(10)),
        };
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
        if self.wire.too_large(&topic, payload.len(), &self.write_failures) {
            return false;
        }
        if retain {
            self.retained.topics.lock().expect("retained lock").insert(topic.clone(), payload.clone());
        }
        if !self.stats.mqtt_connected.load(Relaxed) {
            return retain;
        }
        // A broker that has not acknowledged for a while may hang: QoS-0 images would fill
        // the socket (and block the link in its flush) before the hang is noticed. Retained
        // ones are re-sent on the next connect.
        if qos == QoS::AtMostOnce && self.wire.unacknowledged_for() > QOS0_HOLD {
            return retain;
        }
        self.wire.hand(topic, qos, retain, payload, None)
    }

    /// Writes the message to the outbox, then hands it to the client at QoS 1 if nothing
    /// older waits (otherwise the link sends it in turn, with `"delayed": true`). It leaves
    /// the outbox on its PUBACK. `false` when it could neither be kept nor handed over (too
    /// large for the broker, or the outbox cannot be written while the broker is away).
    pub fn publish_durable(&self, suffix: &str, payload: Vec<u8>) -> bool {
        let topic = self.topic(suffix);
        if self.wire.too_large(&topic, payload.len(), &self.write_failures) {
            return false;
        }
        let mut outbox = self.outbox.lock().expect("outbox lock");
        let now =
            self.stats.mqtt_connected.load(Relaxed) && !self.retained.closing.load(Relaxed) && !outbox.has_unsent();
        let written = outbox.push(&topic, false, &payload);
        self.stats.outbox_failing.store(written.is_err(), Relaxed);
        match written {
            Ok(seq) => {
                if now && self.wire.hand(topic, QoS::AtLeastOnce, false, payload, Some(seq)) {
                    outbox.handed(seq);
                }
                true
            }
            Err(e) => {
                self.stats.outbox_write_failures.fetch_add(1, Relaxed);
                if let Some(suppressed) = self.write_failures.admit() {
                    tracing::error!(topic = %topic, error = %e, suppressed, "Cannot write to the MQTT outbox; the message is sent unkept if the broker takes it now.");
                }
                now && self.wire.hand(topic, QoS::AtLeastOnce, false, payload, None)
            }
        }
    }

    /// Waits, at most until `deadline`, for the link to be connected and every outbox
    /// entry acknowledged: at shutdown, what waited for a broker (or a connect still in
    /// progress) goes out before `offline`. Whatever is left stays on disk for the next run.
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
        let _ = self.wire.client.try_disconnect();
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
    wire: Arc<Wire>,
    base: String,
    retained: Arc<RetainedState>,
    outbox: Arc<Mutex<Outbox>>,
    stats: Arc<PipelineStats>,
    subscriptions: Subscriptions,
    /// A publish unacknowledged for longer than this means the broker hangs.
    ack_timeout: Duration,
    /// Per-message warnings (commands dropped, messages refused): a line per 10 s.
    warnings: LogThrottle,
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
    /// The fleet's topic prefix and where its messages go (`daemon::fleet`): rollouts and
    /// halts, subscribed before the commands.
    pub fleet: Option<(String, crossbeam_channel::Sender<Incoming>)>,
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

/// What the event loop does after an event.
enum Next {
    Continue,
    /// The connection failed (or was dropped as hung): back off, then reconnect.
    Retry,
    Stop,
}

impl Link {
    /// After a connect: the retained state, then `online` (unless stopping).
    fn announce(&self, stopping: bool) {
        let snapshot: Vec<(String, Vec<u8>)> =
            self.retained.topics.lock().expect("retained lock").iter().map(|(t, p)| (t.clone(), p.clone())).collect();
        let available = format!("{}/available", self.base);
        for (topic, payload) in snapshot.into_iter().filter(|(t, _)| *t != available) {
            self.wire.hand(topic, QoS::AtLeastOnce, true, payload, None);
        }
        if !stopping {
            self.wire.hand(available, QoS::AtLeastOnce, true, b"online".to_vec(), None);
        }
    }

    /// Home Assistant's birth message, a fleet message, or a command for the control thread.
    fn incoming(&self, p: rumqttc::v5::mqttbytes::v5::Publish, stopping: bool) {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let fleet =
            self.subscriptions.fleet.as_ref().filter(|(prefix, _)| {
                topic.strip_prefix(prefix.as_str()).is_some_and(|rest| rest.starts_with("/fleet/"))
            });
        if let Some((_, follower)) = fleet {
            if follower.try_send(Incoming { topic: topic.clone(), payload: p.payload.to_vec() }).is_err() {
                tracing::warn!(topic = %topic, "Fleet queue full; message dropped (a retained one comes again on reconnect).");
            }
        } else if self.subscriptions.birth.as_deref() == Some(topic.as_str()) {
            if &p.payload[..] == b"online" {
                // Home Assistant (re)started: it needs the discovery configs and the state again.
                tracing::info!(topic = %topic, "Home Assistant is online; announcing again.");
                self.announce(stopping);
            }
        } else if let Some((_, commands)) = &self.subscriptions.commands
            && commands.try_send(Incoming { topic: topic.clone(), payload: p.payload.to_vec() }).is_err()
            && let Some(suppressed) = self.warnings.admit()
        {
            tracing::warn!(topic = %topic, suppressed, "Command queue full; command dropped.");
        }
    }

    /// Hands the oldest unsent outbox messages to the client while it takes them.
    fn drain_outbox(&self) {
        let mut outbox = self.outbox.lock().expect("outbox lock");
        if self.retained.closing.load(Relaxed) {
            return;
        }
        for _ in 0..OUTBOX_BATCH {
            let Some((seq, message)) = outbox.next_unsent() else { break };
            if self.wire.too_large(&message.topic, message.payload.len(), &self.warnings) {
                outbox.drop_entry(seq, "larger than the broker takes");
                continue;
            }
            let payload = mark_delayed(message.payload);
            if !self.wire.hand(message.topic, QoS::AtLeastOnce, message.retain, payload, Some(seq)) {
                break;
            }
            outbox.handed(seq);
        }
    }

    /// CONNACK: the broker's packet limit, what a lost session took with it, subscriptions,
    /// the retained state and `online`, then the outbox.
    fn connected(&self, ack: &ConnAck, stopping: bool) {
        self.stats.mqtt_connects.fetch_add(1, Relaxed);
        self.stats.mqtt_connected.store(true, Relaxed);
        let broker_max = ack.properties.as_ref().and_then(|p| p.max_packet_size).map_or(usize::MAX, |m| m as usize);
        self.wire.max_packet.store(self.wire.configured_max.min(broker_max), Relaxed);
        let lost = self.wire.handoff.lock().expect("handoff lock").reconnected(ack.session_present, Instant::now());
        self.outbox.lock().expect("outbox lock").unhand(&lost);
        tracing::info!(code = ?ack.code, session_present = ack.session_present, resending = lost.len(), "MQTT connected.");
        let commands = self.subscriptions.commands.iter().flat_map(|(filters, _)| filters.iter().cloned());
        let fleet = self.subscriptions.fleet.iter().flat_map(|(prefix, _)| crate::fleet::filters(prefix));
        for filter in self.subscriptions.birth.iter().cloned().chain(fleet).chain(commands) {
            let _ = self.wire.client.try_subscribe(filter, QoS::AtLeastOnce);
        }
        self.announce(stopping);
        self.drain_outbox();
    }

    /// A PUBACK: the outbox entry it acknowledges is delivered — or refused by the broker
    /// (an ACL, a quota), which no retry changes: dropped, counted.
    fn acked(&self, ack: &PubAck) {
        let Some(seq) = self.wire.handoff.lock().expect("handoff lock").acked(ack.pkid) else { return };
        let mut outbox = self.outbox.lock().expect("outbox lock");
        match ack.reason {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => outbox.ack(seq),
            reason => {
                if let Some(suppressed) = self.warnings.admit() {
                    tracing::error!(?reason, suppressed, "The broker refused an outbox message.");
                }
                outbox.drop_entry(seq, "refused by the broker");
            }
        }
    }

    /// The connection failed: the client moved what it held to its pending list (kept by
    /// [`Handoff`] for a resumed session, given back to the outbox otherwise).
    /// `unresponsive`: the broker stopped answering (counted as such).
    fn lost(&self, connection: &Connection, unresponsive: bool) {
        self.stats.mqtt_connected.store(false, Relaxed);
        self.stats.mqtt_failures.fetch_add(1, Relaxed);
        if unresponsive {
            self.stats.mqtt_unresponsive.fetch_add(1, Relaxed);
        }
        let fresh = connection
            .eventloop
            .pending
            .iter()
            .filter(|r| matches!(r, Request::Publish(p) if p.qos != QoS::AtMostOnce && p.pkid == 0))
            .count();
        self.wire.handoff.lock().expect("handoff lock").connection_lost(fresh);
    }

    /// A publish unacknowledged for longer than the ack timeout: the broker hangs (frozen,
    /// or a partition without a reset). The connection is dropped, counted, and reconnected.
    fn hung(&self, connection: &mut Connection) -> bool {
        let waited = self.wire.unacknowledged_for();
        if waited <= self.ack_timeout {
            return false;
        }
        tracing::warn!(waited_ms = waited.as_millis() as u64, "No PUBACK from the broker; dropping the connection.");
        connection.eventloop.clean();
        true
    }

    fn on_event(&self, connection: &mut Connection, event: Event, stopping: bool) -> Next {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => self.connected(&ack, stopping),
            Event::Incoming(Packet::PubAck(ack)) => {
                self.acked(&ack);
                self.drain_outbox();
            }
            Event::Incoming(Packet::Publish(p)) => self.incoming(p, stopping),
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                self.wire.handoff.lock().expect("handoff lock").sent(pkid, Instant::now());
            }
            Event::Outgoing(Outgoing::Disconnect) => {
                tracing::info!("MQTT disconnected cleanly.");
                // Let the DISCONNECT reach the socket before the event loop is dropped.
                let _ = connection.recv_timeout(Duration::from_millis(100));
                return Next::Stop;
            }
            _ if self.stats.mqtt_connected.load(Relaxed) => self.drain_outbox(),
            _ => {}
        }
        if self.stats.mqtt_connected.load(Relaxed) && self.hung(connection) {
            self.lost(connection, true);
            return Next::Retry;
        }
        Next::Continue
    }

    fn run(self, mut connection: Connection, stop: Receiver<()>, reconnect_max: Duration) {
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
            let next = match connection.recv() {
                Err(rumqttc::v5::RecvError) => Next::Stop,
                Ok(Ok(event)) => self.on_event(&mut connection, event, stopping_since.is_some()),
                Ok(Err(e)) => {
                    self.lost(&connection, matches!(e, ConnectionError::MqttState(StateError::AwaitPingResp)));
                    tracing::warn!(error = %e, "MQTT connection failed.");
                    Next::Retry
                }
            };
            match next {
                Next::Continue => {
                    if self.stats.mqtt_connected.load(Relaxed) {
                        backoff.reset();
                    }
                }
                Next::Stop => break,
                Next::Retry if stopping_since.is_some() => break,
                Next::Retry => {
                    let delay = backoff.next_delay();
                    tracing::info!(retry_in_ms = delay.as_millis() as u64, "MQTT reconnecting.");
                    if !pause(&stop, delay) {
                        stopping_since = Some(Instant::now());
                    }
                }
            }
        }
        self.stats.mqtt_connected.store(false, Relaxed);
    }
}

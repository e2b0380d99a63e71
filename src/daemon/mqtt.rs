//! The MQTT side: connection options (Last Will, credentials, TLS, packet size), the
//! connection thread (reconnect with backoff, re-publish retained state on every connect),
//! and non-blocking publishing.
//!
//! Retained topics are remembered in a [`RetainedState`] so that a reconnect — or a
//! broker that lost its store — gets the latest `status`, `state` and `snapshot` of every
//! camera and then `available = online`, in that order (dashboards see state before the
//! node claims to be up). Publishing never blocks the pipeline: a full client queue is a
//! counted `mqtt_backlog` drop.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rumqttc::{Client, Connection, Event, LastWill, MqttOptions, Packet, QoS, Transport};

use super::config::{MqttConfig, TlsConfig};
use super::pipeline::{Backoff, pause};
use super::stats::PipelineStats;

/// Latest payload of each retained topic, re-published on every connect.
#[derive(Default)]
pub struct RetainedState {
    topics: Mutex<BTreeMap<String, Vec<u8>>>,
}

/// Requests queued in the client before publishing counts as a backlog drop.
const CLIENT_QUEUE: usize = 64;

pub struct Mqtt {
    client: Client,
    pub base: String,
    retained: Arc<RetainedState>,
}

#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error("{path}: {what}")]
    Tls { path: String, what: String },
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
    /// Creates the client and starts the connection thread, which runs until `stop` closes
    /// and the final `offline` has been sent.
    pub fn start(
        config: &MqttConfig,
        stats: Arc<PipelineStats>,
        stop: Receiver<()>,
    ) -> Result<(Self, std::thread::JoinHandle<()>), MqttSetupError> {
        let (client, connection) = Client::new(options(config)?, CLIENT_QUEUE);
        let retained = Arc::new(RetainedState::default());
        let mqtt = Self { client: client.clone(), base: config.base_topic.clone(), retained: retained.clone() };
        let base = config.base_topic.clone();
        let reconnect_max = config.reconnect_max;
        let handle = std::thread::Builder::new()
            .name("mqtt".into())
            .spawn(move || connection_loop(connection, client, base, retained, stats, stop, reconnect_max))
            .expect("spawn mqtt thread");
        Ok((mqtt, handle))
    }

    pub fn topic(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.base)
    }

    /// Publishes without blocking; `false` when the client queue is full (a backlog drop).
    pub fn publish(&self, suffix: &str, qos: QoS, retain: bool, payload: Vec<u8>) -> bool {
        let topic = self.topic(suffix);
        if retain {
            self.retained.topics.lock().expect("retained lock").insert(topic.clone(), payload.clone());
        }
        self.client.try_publish(topic, qos, retain, payload).is_ok()
    }

    /// Publishes the final retained `offline` states and disconnects cleanly.
    pub fn go_offline(&self, cameras: &[String]) {
        for camera in cameras {
            self.publish(&format!("{camera}/status"), QoS::AtLeastOnce, true, b"offline".to_vec());
        }
        self.publish("available", QoS::AtLeastOnce, true, b"offline".to_vec());
        let _ = self.client.try_disconnect();
    }
}

fn connection_loop(
    mut connection: Connection,
    client: Client,
    base: String,
    retained: Arc<RetainedState>,
    stats: Arc<PipelineStats>,
    stop: Receiver<()>,
    reconnect_max: Duration,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), reconnect_max);
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
                let snapshot: Vec<(String, Vec<u8>)> = retained
                    .topics
                    .lock()
                    .expect("retained lock")
                    .iter()
                    .map(|(t, p)| (t.clone(), p.clone()))
                    .collect();
                let available = format!("{base}/available");
                for (topic, payload) in snapshot.into_iter().filter(|(t, _)| *t != available) {
                    let _ = client.try_publish(topic, QoS::AtLeastOnce, true, payload);
                }
                if stopping_since.is_none() {
                    let _ = client.try_publish(available, QoS::AtLeastOnce, true, "online");
                }
            }
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) => {
                tracing::info!("MQTT disconnected cleanly.");
                // Let the DISCONNECT reach the socket before the event loop is dropped.
                let _ = connection.recv_timeout(Duration::from_millis(100));
                break;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                stats.mqtt_connected.store(false, Relaxed);
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

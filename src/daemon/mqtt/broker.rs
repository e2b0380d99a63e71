//! The embedded MQTT broker (rumqttd, feature `embedded-broker`) for the out-of-the-box
//! demo: `mqtt.embedded_broker = true` serves plain MQTT on `mqtt.host:mqtt.port`, so a new
//! user needs nothing else installed. Production nodes talk to the plant's broker.
//!
//! Users' clients (MQTT 3.1.1 or 5) connect on the configured port. The daemon's own client
//! speaks MQTT 5 and rumqttd serves each protocol version on a listener of its own, so the
//! broker also listens for MQTT 5 on a free loopback port, which [`client_address`] gives.
//!
//! rumqttd's `Broker::start` blocks for good and has no stop call, so its thread lives as
//! long as the process (and so does its address); the daemon exits right after its own
//! clean MQTT disconnect.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::OnceLock;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::config::MqttConfig;

#[derive(Debug, thiserror::Error)]
#[error("embedded broker: cannot listen on {address}: {reason}")]
pub struct BrokerError {
    address: String,
    reason: String,
}

/// The embedded broker's MQTT 5 listener, once it is started.
static CLIENT_ADDRESS: OnceLock<SocketAddr> = OnceLock::new();

/// Where the daemon's own client connects to the embedded broker.
pub fn client_address() -> Option<SocketAddr> {
    CLIENT_ADDRESS.get().copied()
}

/// Starts the broker on `config.host:config.port` (and an MQTT 5 listener on a free
/// loopback port) and returns once both accept connections.
pub fn start(config: &MqttConfig) -> Result<(), BrokerError> {
    let address = format!("{}:{}", config.host, config.port);
    let fail = |reason: String| BrokerError { address: address.clone(), reason };
    let listen: SocketAddr = address
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("host does not resolve".into()))?;
    // Fail early and clearly if the port is taken (rumqttd would only log it).
    drop(std::net::TcpListener::bind(listen).map_err(|e| fail(e.to_string()))?);
    // A free loopback port for the daemon's MQTT 5 client (freed here, bound by rumqttd).
    let v5 = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| fail(format!("no free loopback port for the MQTT 5 listener: {e}")))?;
    let server = |name: &str, listen: SocketAddr| ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: config.max_packet_bytes,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let broker_config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 64 << 20,
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("demo".to_string(), server("edge-inspect-demo", listen))])),
        v5: Some(HashMap::from([("daemon".to_string(), server("edge-inspect-daemon", v5))])),
        ..Config::default()
    };
    let mut broker = Broker::new(broker_config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "Embedded MQTT broker stopped.");
            }
        })
        .map_err(|e| fail(e.to_string()))?;
    // Wait until it accepts connections (it binds asynchronously).
    for _ in 0..50 {
        if std::net::TcpStream::connect(listen).is_ok() && std::net::TcpStream::connect(v5).is_ok() {
            tracing::info!(%listen, mqtt5 = %v5, "Embedded MQTT broker listening (demo use).");
            let _ = CLIENT_ADDRESS.set(v5);
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(fail("did not start listening within 5 s".into()))
}

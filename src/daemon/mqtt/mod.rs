//! The daemon's MQTT side: everything it says and hears on the broker.
//!
//! - [`client`]: connection options, the connection thread (reconnect with backoff,
//!   retained state re-published on connect) and non-blocking publishing, with the
//!   [`outbox`] keeping on disk what cannot go now;
//! - [`publish`]: per inspected frame, the alert, mask, snapshot and retained state, the
//!   [`events`] of defect episodes, and the recorder's share;
//! - [`control`]: the `…/set` commands heard, and the retained `…/state` echoes;
//! - [`homeassistant`]: discovery messages;
//! - `broker` (feature `embedded-broker`): the demo's embedded broker.
//!
//! It depends on the daemon's registry of cameras and its model loader, never on the main
//! thread's wiring.

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod client;
pub mod control;
pub mod events;
pub mod handoff;
pub mod homeassistant;
pub mod outbox;
pub mod publish;
pub mod verdict;

pub use client::{Incoming, Mqtt, Subscriptions};

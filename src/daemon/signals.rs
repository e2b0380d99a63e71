//! Signals: SIGTERM and SIGINT stop the daemon, SIGHUP reloads its configuration.
//! signal-hook's iterator runs on a supervised thread and turns each signal into a message
//! the main loop selects on, so no work happens in a signal handler.

use crossbeam_channel::{Receiver, bounded};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use super::supervisor::{Role, Supervisor};

pub struct Signals {
    /// SIGTERM or SIGINT.
    pub stop: Receiver<()>,
    /// SIGHUP.
    pub reload: Receiver<()>,
    handle: signal_hook::iterator::Handle,
}

impl Signals {
    /// Installs the handlers and starts the thread that forwards them.
    pub fn listen(supervisor: &mut Supervisor) -> anyhow::Result<Self> {
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
            .map_err(|e| anyhow::anyhow!("cannot install the SIGTERM/SIGINT/SIGHUP handlers: {e}"))?;
        let handle = signals.handle();
        let ((stop_tx, stop), (reload_tx, reload)) = (bounded(4), bounded(4));
        supervisor.spawn("signals", Role::Link, None, move || {
            for signal in signals.forever() {
                let _ = if signal == SIGHUP { reload_tx.try_send(()) } else { stop_tx.try_send(()) };
            }
        })?;
        Ok(Self { stop, reload, handle })
    }

    /// Ends the forwarding thread (at shutdown).
    pub fn close(&self) {
        self.handle.close();
    }
}

//! A loopback TCP relay whose connections can be cut: an upstream that goes away
//! with requests in flight, without killing the process behind it.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP relay on a free 127.0.0.1 port in front of a target address. Each accepted
/// connection gets its own connection to the target; bytes are copied both ways.
///
/// | call | open connections | new connections |
/// |---|---|---|
/// | [`cut`](Relay::cut) | dropped | relayed |
/// | [`pause`](Relay::pause) | dropped | accepted and closed at once, until [`resume`](Relay::resume) |
/// | [`stop`](Relay::stop) | dropped | refused: the port is closed for good |
///
/// A cut applies to the connections open at that moment only. Dropping the relay
/// stops it. Needs a tokio runtime (it runs on spawned tasks).
pub struct Relay {
    /// `http://127.0.0.1:PORT`: where to connect instead of the target.
    pub url: String,
    /// The relay's listening address.
    pub addr: SocketAddr,
    ctl: watch::Sender<Ctl>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Paused,
    Stopped,
}

#[derive(Debug, Clone, Copy)]
struct Ctl {
    /// Bumped by every cut; a connection ends when it differs from its value at accept.
    cuts: u64,
    mode: Mode,
}

impl Relay {
    /// Starts relaying to `target`: `IP:PORT` or `http://IP:PORT`.
    pub async fn start(target: &str) -> Relay {
        let target = target.trim_start_matches("http://").trim_end_matches('/').to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let (ctl, ctl_rx) = watch::channel(Ctl { cuts: 0, mode: Mode::Open });
        tokio::spawn(accept_loop(listener, target, ctl_rx));
        Relay { url: format!("http://{addr}"), addr, ctl }
    }

    /// Drops every open connection through the relay; new ones are relayed as before.
    pub fn cut(&self) {
        self.ctl.send_modify(|c| c.cuts += 1);
    }

    /// Drops every open connection and closes new ones at once until [`Relay::resume`].
    pub fn pause(&self) {
        self.set_mode(Mode::Paused);
    }

    /// Relays new connections again after [`Relay::pause`] (not after [`Relay::stop`]).
    pub fn resume(&self) {
        self.ctl.send_if_modified(|c| {
            let paused = c.mode == Mode::Paused;
            if paused {
                c.mode = Mode::Open;
            }
            paused
        });
    }

    /// Drops every open connection and closes the listening socket: from now on
    /// connecting to the relay is refused, like an etcd that died.
    pub fn stop(&self) {
        self.set_mode(Mode::Stopped);
    }

    fn set_mode(&self, mode: Mode) {
        self.ctl.send_modify(|c| {
            c.cuts += 1;
            if c.mode != Mode::Stopped {
                c.mode = mode;
            }
        });
    }
}

async fn accept_loop(listener: TcpListener, target: String, mut ctl: watch::Receiver<Ctl>) {
    loop {
        tokio::select! {
            changed = ctl.changed() => {
                // Stopped, or the relay was dropped: dropping the listener refuses
                // connections from now on.
                if changed.is_err() || ctl.borrow_and_update().mode == Mode::Stopped {
                    return;
                }
            }
            accepted = listener.accept() => {
                let Ok((inbound, _)) = accepted else { return };
                let at_accept = *ctl.borrow();
                if at_accept.mode != Mode::Open {
                    continue; // paused: `inbound` is closed here
                }
                tokio::spawn(relay_one(inbound, target.clone(), ctl.clone(), at_accept.cuts));
            }
        }
    }
}

/// Copies between `inbound` and a new connection to `target` until either side
/// closes or a cut after `cuts_at_accept` (both sockets are dropped then).
async fn relay_one(mut inbound: TcpStream, target: String, mut ctl: watch::Receiver<Ctl>, cuts_at_accept: u64) {
    let Ok(mut outbound) = TcpStream::connect(&target).await else { return };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = ctl.wait_for(|c| c.cuts != cuts_at_accept) => {}
    }
}

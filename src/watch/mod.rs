//! Watch: every tenant's watches served from one upstream watch.
//!
//! ```text
//!  etcd ──one watch (prev_kv, progress)──▶ upstream ──▶ Hub (one lock)
//!                                                    ├─ ring: recent events, bounded
//!                                                    ├─ fan-out: watchers by tenant and root
//!                                                    └─ progress: streams waiting for a proof
//!  client streams ◀── sink (one budget per stream) ◀── dispatch
//! ```
//!
//! - [`session`]: one client stream: one future that sends responses and reads requests;
//! - [`sink`]: the per-stream ordered queue and its one budget for every response;
//! - [`event`], [`watcher`]: an upstream event in tenant form; a client watcher;
//! - [`hub`]: the lock, dispatch and the hub's tasks, over owned parts: [`ring`]
//!   (recent events), [`fanout`] (the watcher index), [`progress`] (the progress
//!   state machine, pure);
//! - [`upstream`]: the one upstream watch; [`catchup`]: starts older than the ring;
//! - [`probe`]: progress probes (one at a time) and answers; [`passthrough`]:
//!   watches of global keys, relayed.
//!
//! Every task of the watch path is a task of the process's
//! [`Tasks`](crate::shutdown::Tasks) and ends when the hub stops (the shutdown
//! signal, or [`Hub::stop`]); client streams then end with `UNAVAILABLE`.

pub mod catchup;
pub mod event;
pub mod fanout;
pub mod hub;
pub mod passthrough;
pub mod probe;
pub mod progress;
pub mod ring;
pub mod session;
pub mod sink;
pub mod upstream;
pub mod watcher;

pub use hub::{Hub, HubSync};

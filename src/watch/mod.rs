//! Watch: every tenant's watches served from one upstream watch.
//!
//! ```text
//!  etcd ──one watch (prev_kv, progress)──▶ upstream ──▶ Hub (one lock)
//!                                                    ├─ ring: recent events, bounded
//!                                                    ├─ fan-out: watchers by tenant and root
//!                                                    └─ progress: streams waiting for a proof
//!  client streams ◀── sink (bounded queue per stream) ◀── dispatch
//! ```
//!
//! - [`session`]: one client stream (its request reader and response stream);
//! - [`sink`]: the per-stream ordered, bounded queue;
//! - [`event`], [`watcher`]: an upstream event in tenant form; a client watcher;
//! - [`hub`]: the shared state and dispatch; [`fanout`]: the watcher index;
//! - [`upstream`]: the one upstream watch; [`catchup`]: starts older than the ring;
//! - [`progress`]: progress answers and notifications; [`passthrough`]: watches of
//!   global keys, relayed.

pub mod catchup;
pub mod event;
pub mod fanout;
pub mod hub;
pub mod passthrough;
pub mod progress;
pub mod session;
pub mod sink;
pub mod upstream;
pub mod watcher;

pub use hub::Hub;

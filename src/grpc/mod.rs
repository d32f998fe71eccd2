//! The gRPC edge: one HTTP/2 server per listener and one file per etcd service.
//! Services are thin: they take the caller's [`Scope`](crate::keyspace::Scope) and
//! deadline, hand the request to [`ops`](crate::ops) or [`watch`](crate::watch), and
//! turn the result into an answer in one place ([`answer`]).
//!
//! - [`server`]: listeners, the tower stack, shutdown and drain;
//! - [`serve`]: a listener's accept loop and HTTP/2 connections (hyper);
//! - [`paced`]: a connection's socket, read until it opened a few streams per turn;
//! - [`accept`]: accept-error backoff (out of file descriptors);
//! - [`layer`]: per-call metrics;
//! - [`span`]: the span and request id of every call (see [`crate::trace`]);
//! - [`tls`]: a listener's TLS (swapped when its files change), and the scope from a
//!   request's client certificate;
//! - [`handshake`]: TLS handshakes off the accept loop, bounded in number and time;
//! - [`kv`], [`lease`], [`watch`], [`maintenance`], [`cluster`]: the etcd services.

use tonic::{Response, Status};

use crate::error::Result;

/// The body of an admin-only call, forwarded unchanged to the etcd cluster: `$call`
/// is the upstream helper (`maintenance_call`, `cluster_call`) and `$method` the
/// client method. Other backends have no etcd cluster to administer: `UNIMPLEMENTED`.
macro_rules! admin_forward {
    ($self:ident, $req:ident, $call:ident, $method:ident, $what:literal, $retry:expr) => {{
        let ctx = $self.proxy.ctx(&$req);
        let fut = async {
            let scope = $self.scope.of(&$self.proxy.resolver, &$req)?;
            $self.proxy.resolver.require_admin(&scope, $what)?;
            let msg = $req.into_inner();
            let up = $crate::grpc::etcd_only(&$self.proxy, $what)?;
            let resp = up.$call(&ctx, $retry, &msg, |mut c, r| async move { c.$method(r).await }).await?;
            Ok::<_, $crate::error::Error>(resp)
        };
        $crate::grpc::answer(fut).await
    }};
}

pub mod accept;
pub mod cluster;
pub mod handshake;
pub mod kv;
pub mod layer;
pub mod lease;
pub mod limits;
pub mod maintenance;
pub mod paced;
pub mod serve;
pub mod server;
pub mod span;
pub mod tls;
pub mod watch;

/// The etcd cluster behind the proxy, for `what` (an etcd administration call);
/// refused on a backend that is not etcd.
pub fn etcd_only<'a>(proxy: &'a crate::ops::Proxy, what: &str) -> Result<&'a crate::upstream::Upstream> {
    proxy.backend.etcd().ok_or_else(|| {
        crate::error::Error::Unsupported(format!("{what} administers an etcd cluster; this etcdmux stores in SQL"))
    })
}

/// Runs one unary call's work and turns the result into the gRPC answer: the one
/// place where etcdmux's errors become statuses. (The call's span is
/// [`span`]'s, around the whole call.) The response's size goes to the call's
/// per-tenant metrics.
pub async fn answer<T: prost::Message>(
    work: impl std::future::Future<Output = Result<T>>,
) -> std::result::Result<Response<T>, Status> {
    let resp = work.await?;
    crate::metrics::per_tenant::report_bytes_out(|| resp.encoded_len());
    Ok(Response::new(resp))
}

//! The Watch service: each client stream is served by a [`session`] over the shared
//! [`Hub`], framed by etcdmux itself ([`crate::codec::frame`]) rather than by
//! tonic's generated server. A stream is one allocation for its whole state (the
//! session, the request decoder, this body), where tonic's codec kept its own
//! buffers and boxes per stream; with one stream per (project, resource), that
//! difference is paid hundreds of thousands of times.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use http::{HeaderMap, HeaderValue};
use hyper::body::Frame;
use pin_project_lite::pin_project;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tower::Service;

use super::tls::ScopeSource;
use crate::codec::frame::{self, Decoder};
use crate::ops::Proxy;
use crate::upstream::REQUIRE_LEADER;
use crate::watch::session::{self, ResponseStream};
use crate::watch::Hub;

/// A DATA frame carries the responses that are ready together, up to this size
/// (tonic's yield threshold).
const BATCH_BYTES: usize = 32 * 1024;

/// The `etcdserverpb.Watch` service: in front of tonic's router ([`WatchFirst`]), or
/// in it (it is a [`NamedService`]).
#[derive(Clone)]
pub struct WatchService {
    proxy: Arc<Proxy>,
    scope: ScopeSource,
    hub: Arc<Hub>,
}

impl WatchService {
    pub fn new(proxy: Arc<Proxy>, scope: impl Into<ScopeSource>, hub: Arc<Hub>) -> WatchService {
        WatchService { proxy, scope: scope.into(), hub }
    }

    /// Opens one client stream; an error refusing it is answered "trailers only".
    fn open(&self, req: http::Request<Body>) -> http::Response<Body> {
        let (parts, body) = req.into_parts();
        if let Some(encoding) = parts.headers.get("grpc-encoding").filter(|e| e.as_bytes() != b"identity") {
            let name = String::from_utf8_lossy(encoding.as_bytes());
            let mut status =
                Status::unimplemented(format!("Content is compressed with `{name}` which isn't supported"));
            // What the client may send instead, as gRPC recommends.
            status
                .metadata_mut()
                .insert("grpc-accept-encoding", tonic::metadata::MetadataValue::from_static("identity"));
            return status.into_http();
        }
        let require_leader = parts.headers.contains_key(REQUIRE_LEADER);
        let certs = || {
            let ext = &parts.extensions;
            ext.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|t| t.peer_certs())
        };
        let scope = match self.scope.of_certs(&self.proxy.resolver, certs) {
            Ok(scope) => scope,
            Err(e) => return Status::from(e).into_http(),
        };
        let cfg = &self.proxy.cfg.server;
        let inbound = Decoder::new(body, cfg.max_request_bytes);
        // No task of its own: the response body reads the requests too, in the
        // call's span; it ends when the hub stops (shutdown).
        let responses = session::start(self.proxy.clone(), scope, self.hub.clone(), require_leader, inbound);
        // gRPC's length prefix is 32 bits: no larger bound means anything.
        let max = u32::try_from(cfg.max_response_bytes).unwrap_or(u32::MAX);
        let body = WatchBody { responses, max, end: None, ended: false };
        let mut resp = http::Response::new(Body::new(body));
        resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        resp
    }
}

impl NamedService for WatchService {
    const NAME: &'static str = "etcdserverpb.Watch";
}

type Opening = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl Service<http::Request<Body>> for WatchService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Opening;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Opening {
        let svc = self.clone();
        // Opened when polled: inside the call's scope (span, tenant slot), which the
        // layers set around the future, not around this call.
        Box::pin(async move { Ok(svc.open(req)) })
    }
}

/// The listener's services with Watch served first, before tonic's router: the
/// router boxes a body again at each of its layers (a few small allocations for
/// as long as a stream lives).
#[derive(Clone)]
pub struct WatchFirst<S> {
    watch: WatchService,
    rest: S,
}

impl<S> WatchFirst<S> {
    pub fn new(watch: WatchService, rest: S) -> WatchFirst<S> {
        WatchFirst { watch, rest }
    }
}

/// The path of Watch calls.
const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";

impl<S> Service<http::Request<Body>> for WatchFirst<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = futures::future::Either<Opening, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.rest.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() == WATCH_PATH {
            futures::future::Either::Left(self.watch.call(req))
        } else {
            futures::future::Either::Right(self.rest.call(req))
        }
    }
}

pin_project! {
    /// The response body of one stream: its responses framed, batched into DATA
    /// frames, then the status in the trailers.
    struct WatchBody {
        #[pin]
        responses: ResponseStream,
        max: u32,
        // The status to end with, after the data frame being sent.
        end: Option<Box<Status>>,
        ended: bool,
    }
}

/// The trailers that end a stream with `status`.
fn trailers(status: &Status) -> Frame<Bytes> {
    let mut headers = HeaderMap::new();
    if status.add_header(&mut headers).is_err() {
        // Only a message that is not a valid header fails; the code still goes.
        headers.insert("grpc-status", HeaderValue::from(status.code() as i32));
    }
    Frame::trailers(headers)
}

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let mut this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        if let Some(status) = this.end.take() {
            *this.ended = true;
            return Poll::Ready(Some(Ok(trailers(&status))));
        }
        // A fresh buffer each time, gone with the frame: an idle stream holds none.
        let mut buf = BytesMut::new();
        let end = loop {
            match this.responses.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(resp))) => {
                    if let Err(status) = frame::encode(&resp, *this.max as usize, &mut buf) {
                        break Some(status);
                    }
                    if buf.len() >= BATCH_BYTES {
                        break None;
                    }
                }
                Poll::Ready(Some(Err(status))) => break Some(status),
                Poll::Ready(None) => break Some(Status::ok("")),
                Poll::Pending if buf.is_empty() => return Poll::Pending,
                Poll::Pending => break None,
            }
        };
        if let Some(status) = end {
            if buf.is_empty() {
                *this.ended = true;
                return Poll::Ready(Some(Ok(trailers(&status))));
            }
            *this.end = Some(Box::new(status));
        }
        Poll::Ready(Some(Ok(Frame::data(buf.freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::WatchBody;

    /// A stream's whole state is this one allocation, kept by every open Watch
    /// stream (one per (project, resource) for an apiserver): it must not grow
    /// unnoticed. 304 bytes is a 320-byte block of glibc's malloc.
    #[test]
    fn a_streams_state_stays_small() {
        let size = std::mem::size_of::<WatchBody>();
        assert!(size <= 304, "WatchBody is {size} bytes");
    }
}

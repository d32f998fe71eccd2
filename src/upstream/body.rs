//! Unary requests to etcd as two HTTP/2 frames, as etcd's own (Go) clients send
//! them: HEADERS, then one DATA frame carrying END_STREAM.
//!
//! tonic's request body for a unary call is a stream of one message that says it has
//! ended only when polled once more, so hyper sends the message in one DATA frame
//! and then an empty DATA frame to end the stream: a third frame for etcd to read
//! and for both sides to process, on every call. [`WholeBody`] encodes the message
//! up front (tonic's encoder is synchronous for a unary call) and hands hyper a body
//! that knows it ends with it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as _, Frame};
use tonic::body::Body;
use tower::Service;

/// A client service sending unary requests in one DATA frame with END_STREAM.
#[derive(Debug, Clone)]
pub struct WholeBody<S> {
    inner: S,
}

impl<S> WholeBody<S> {
    pub fn new(inner: S) -> WholeBody<S> {
        WholeBody { inner }
    }
}

impl<S> Service<http::Request<Body>> for WholeBody<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let (parts, body) = req.into_parts();
        self.inner.call(http::Request::from_parts(parts, whole(body)))
    }
}

/// `body` as one frame that ends the stream, when it is one data frame that is
/// ready now; otherwise what was read of it followed by the rest, unchanged.
fn whole(mut body: Body) -> Body {
    // Nothing waits on this waker: a body that is not ready is handed on, and hyper
    // polls it again with its own.
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    let first = match Pin::new(&mut body).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame,
        Poll::Ready(None) => return Body::empty(),
        Poll::Ready(Some(Err(e))) => return Body::new(Replay { taken: Some(Err(e)), rest: None }),
        Poll::Pending => return body,
    };
    let data = match first.into_data() {
        Ok(data) => data,
        Err(frame) => return Body::new(Replay { taken: Some(Ok(frame)), rest: Some(body) }),
    };
    match Pin::new(&mut body).poll_frame(&mut cx) {
        Poll::Ready(None) => Body::new(http_body_util::Full::new(data)),
        Poll::Ready(Some(second)) => Body::new(Replay {
            taken: Some(Ok(Frame::data(data))),
            rest: Some(Body::new(Replay { taken: Some(second), rest: Some(body) })),
        }),
        Poll::Pending => Body::new(Replay { taken: Some(Ok(Frame::data(data))), rest: Some(body) }),
    }
}

/// A frame already read from a body, then the rest of it.
struct Replay {
    taken: Option<Result<Frame<Bytes>, tonic::Status>>,
    rest: Option<Body>,
}

impl hyper::body::Body for Replay {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(f) = self.taken.take() {
            return Poll::Ready(Some(f));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.taken.is_none() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// The body tonic builds for a unary request: a stream of one message.
    fn unary_body(msg: &'static [u8]) -> Body {
        let stream = futures::stream::once(async move { Ok::<_, tonic::Status>(Frame::data(Bytes::from_static(msg))) });
        Body::new(http_body_util::StreamBody::new(stream))
    }

    #[tokio::test]
    async fn a_unary_body_becomes_one_frame_that_ends_the_stream() {
        let before = unary_body(b"message");
        assert!(!before.is_end_stream());
        let mut after = whole(unary_body(b"message"));
        let frame = after.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"message")));
        assert!(after.is_end_stream(), "hyper sends the data with END_STREAM, no empty frame after it");
    }

    #[tokio::test]
    async fn other_bodies_pass_through_whole() {
        let two = futures::stream::iter([
            Ok::<_, tonic::Status>(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"b"))),
        ]);
        let got = whole(Body::new(http_body_util::StreamBody::new(two))).collect().await.expect("collected");
        assert_eq!(got.to_bytes(), Bytes::from_static(b"ab"));
        let failing = futures::stream::once(async { Err::<Frame<Bytes>, _>(tonic::Status::internal("encode")) });
        let err = whole(Body::new(http_body_util::StreamBody::new(failing))).collect().await;
        assert_eq!(err.err().map(|s| s.code()), Some(tonic::Code::Internal));
        assert!(whole(Body::empty()).is_end_stream());
    }
}

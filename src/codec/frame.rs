//! gRPC's message framing (a compressed flag, a 4-byte length, the message) for the
//! Watch stream, which etcdmux serves without tonic's codec (`grpc::watch`).
//!
//! tonic keeps, per stream, a decoder and an encoder with buffers that keep their
//! largest size; with one Watch stream per (project, resource) that is memory per
//! stream times hundreds of thousands. Here an idle stream keeps no buffer: a
//! request is decoded from the frame it came in (copied only when it spans frames),
//! and responses are encoded into a buffer that leaves with them. Errors carry
//! tonic's texts, so a client sees what it saw before.

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::Stream;
use hyper::body::Body as _;
use tonic::body::Body;
use tonic::Status;

/// The prefix of every message: compressed flag and length.
const HEADER: usize = 5;

/// At most this much is reserved for a message split over frames before its bytes
/// arrive; the buffer grows with them.
const RESERVE_AHEAD: usize = 64 * 1024;

/// The messages of a request body, decoded as they arrive; at most `max` bytes each.
pub struct Decoder<T> {
    body: Body,
    /// The part of a message that came in an earlier frame, never empty; none
    /// between messages. Boxed: most streams never see a split message, and every
    /// stream carries this field for its life.
    partial: Option<Box<BytesMut>>,
    /// The current frame's bytes not decoded yet.
    frame: Bytes,
    /// gRPC's length prefix is 32 bits: no larger bound means anything.
    max: u32,
    ended: bool,
    _msg: PhantomData<fn() -> T>,
}

impl<T> Decoder<T> {
    pub fn new(body: Body, max: usize) -> Decoder<T> {
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        Decoder { body, partial: None, frame: Bytes::new(), max, ended: false, _msg: PhantomData }
    }
}

/// The length of the message at the start of `buf`, once its header is there.
fn message_len(buf: &[u8], max: u32) -> Result<Option<usize>, Status> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    match buf[0] {
        0 => {}
        // etcdmux accepts no grpc-encoding (refused before the stream starts), so a
        // compressed message is a protocol error, as gRPC specifies.
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ))
        }
        f => {
            return Err(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1), while sending request"
            )))
        }
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len > max {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: {max} bytes"
        )));
    }
    Ok(Some(len as usize))
}

fn decode<T: prost::Message + Default>(msg: &[u8]) -> Result<T, Status> {
    T::decode(msg).map_err(|e| Status::internal(e.to_string()))
}

impl<T: prost::Message + Default> Decoder<T> {
    /// The next whole message of what has arrived, if there is one.
    fn next_message(&mut self) -> Result<Option<T>, Status> {
        let next = self.take_message();
        // A frame is a slice of the connection's read buffer: an empty one still
        // holds it, and an idle stream would keep a chunk of it alive.
        if self.frame.is_empty() {
            self.frame = Bytes::new();
        }
        next
    }

    fn take_message(&mut self) -> Result<Option<T>, Status> {
        let Some(partial) = self.partial.as_mut() else {
            // Nothing to start a message with: keep no empty partial (it would
            // read as a message cut short at the end of the stream).
            if self.frame.is_empty() {
                return Ok(None);
            }
            // The usual case: whole messages in the frame, decoded where they lie.
            let len = message_len(&self.frame, self.max)?;
            let Some(len) = len.filter(|len| self.frame.len() >= HEADER + len) else {
                // What a header announces is not reserved whole before it arrives:
                // five bytes must not cost a stream `max` bytes.
                let mut partial = BytesMut::with_capacity(len.map_or(HEADER, |len| (HEADER + len).min(RESERVE_AHEAD)));
                partial.extend_from_slice(&self.frame);
                self.partial = Some(Box::new(partial));
                self.frame.clear();
                return Ok(None);
            };
            let msg = decode(&self.frame[HEADER..HEADER + len]);
            self.frame.advance(HEADER + len);
            return msg.map(Some);
        };
        // A message split over frames: gather it.
        while partial.len() < HEADER && self.frame.has_remaining() {
            partial.put_u8(self.frame.get_u8());
        }
        let Some(len) = message_len(partial, self.max)? else { return Ok(None) };
        let want = (HEADER + len - partial.len()).min(self.frame.len());
        partial.extend_from_slice(&self.frame.split_to(want));
        if partial.len() < HEADER + len {
            return Ok(None);
        }
        let msg = decode(&partial[HEADER..]);
        // An idle stream keeps no buffer.
        self.partial = None;
        msg.map(Some)
    }
}

impl<T> Decoder<T> {
    /// Ends the stream with `status`: nothing more is read or decoded after it.
    fn fail(&mut self, status: Status) -> Status {
        self.ended = true;
        self.partial = None;
        self.frame = Bytes::new();
        status
    }
}

impl<T: prost::Message + Default> Stream for Decoder<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if !self.frame.is_empty() || self.partial.is_some() {
                match self.next_message() {
                    Ok(Some(msg)) => return Poll::Ready(Some(Ok(msg))),
                    Ok(None) => {}
                    Err(status) => return Poll::Ready(Some(Err(self.fail(status)))),
                }
            }
            if self.ended {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                // Trailers end a request body; there is nothing in them for a stream.
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.frame = data;
                    }
                }
                // The client reset the stream: an end, not an error (as tonic has it).
                Some(Err(status)) if status.code() == tonic::Code::Cancelled => {
                    self.fail(status);
                    return Poll::Ready(None);
                }
                Some(Err(status)) => return Poll::Ready(Some(Err(self.fail(status)))),
                None => {
                    self.ended = true;
                    if self.partial.is_some() {
                        let status = Status::internal("Unexpected EOF decoding stream.");
                        return Poll::Ready(Some(Err(self.fail(status))));
                    }
                }
            }
        }
    }
}

/// Appends `msg`, framed, to `buf`; refused (and `buf` unchanged) when it is over
/// `max` bytes.
pub fn encode<T: prost::Message>(msg: &T, max: usize, buf: &mut BytesMut) -> Result<(), Status> {
    let len = msg.encoded_len();
    if len > max {
        return Err(Status::out_of_range(format!(
            "Error, encoded message length too large: found {len} bytes, the limit is: {max} bytes"
        )));
    }
    let len32 = u32::try_from(len).map_err(|_| {
        Status::resource_exhausted(format!("Cannot return body with more than 4GB of data but got {len} bytes"))
    })?;
    buf.reserve(HEADER + len);
    buf.put_u8(0);
    buf.put_u32(len32);
    // Cannot fail: the room was reserved above.
    msg.encode(buf).map_err(|e| Status::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb::{watch_request::RequestUnion, WatchCancelRequest, WatchRequest};
    use futures::StreamExt;
    use hyper::body::Frame;

    fn cancel(id: i64) -> WatchRequest {
        WatchRequest { request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest { watch_id: id })) }
    }

    /// A request body of these frames.
    fn body(frames: Vec<Bytes>) -> Body {
        let s = futures::stream::iter(frames.into_iter().map(|b| Ok::<_, Status>(Frame::data(b))));
        Body::new(http_body_util::StreamBody::new(s))
    }

    fn framed(msgs: &[WatchRequest]) -> Bytes {
        let mut buf = BytesMut::new();
        for m in msgs {
            encode(m, 1 << 20, &mut buf).expect("encoded");
        }
        buf.freeze()
    }

    async fn decode_all(frames: Vec<Bytes>, max: usize) -> Vec<Result<WatchRequest, Status>> {
        Decoder::<WatchRequest>::new(body(frames), max).collect().await
    }

    #[tokio::test]
    async fn messages_decode_however_the_frames_cut_them() {
        let msgs: Vec<_> = (1..=4).map(cancel).collect();
        let all = framed(&msgs);
        // Every way of cutting the bytes into two frames, and one byte per frame.
        let mut cuts: Vec<Vec<Bytes>> = (0..=all.len()).map(|i| vec![all.slice(..i), all.slice(i..)]).collect();
        cuts.push((0..all.len()).map(|i| all.slice(i..i + 1)).collect());
        for frames in cuts {
            let got: Vec<_> = decode_all(frames, 1024).await.into_iter().map(|r| r.expect("decoded")).collect();
            assert_eq!(got, msgs);
        }
    }

    #[tokio::test]
    async fn bad_frames_end_with_tonics_errors() {
        let one = framed(&[cancel(1)]);
        // One error, then the stream ends (a stream that kept failing on the same
        // bytes would be polled for ever).
        let too_big = decode_all(vec![one.clone(), one.clone()], 2).await;
        assert_eq!(too_big.len(), 1);
        let e = too_big[0].as_ref().expect_err("over the limit");
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        assert!(e.message().contains("decoded message length too large"), "{}", e.message());

        let mut compressed = one.to_vec();
        compressed[0] = 1;
        let got = decode_all(vec![Bytes::from(compressed), one.clone()], 1024).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().expect_err("compressed").code(), tonic::Code::Internal);

        let cut = decode_all(vec![one.slice(..one.len() - 1)], 1024).await;
        assert_eq!(cut[0].as_ref().expect_err("cut short").message(), "Unexpected EOF decoding stream.");

        let garbage = decode_all(vec![Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff]), one], 1024).await;
        assert_eq!(garbage.len(), 1);
        assert_eq!(garbage[0].as_ref().expect_err("not protobuf").code(), tonic::Code::Internal);
        assert!(decode_all(vec![], 1024).await.is_empty(), "an empty body is no message and no error");
    }

    /// Regression: an idle stream kept the frame its last message came in, a slice
    /// of the connection's read buffer (8 KiB or more), alive.
    #[tokio::test]
    async fn a_stream_waiting_for_more_keeps_no_frame() {
        let frame = framed(&[cancel(1), cancel(2)]);
        let probe = frame.clone();
        let rest = futures::stream::pending::<Result<Frame<Bytes>, Status>>();
        let s = futures::stream::iter([Ok::<_, Status>(Frame::data(frame))]).chain(rest);
        let mut dec = Decoder::<WatchRequest>::new(Body::new(http_body_util::StreamBody::new(s)), 1024);
        assert_eq!(dec.next().await.expect("one").expect("decoded"), cancel(1));
        assert_eq!(dec.next().await.expect("two").expect("decoded"), cancel(2));
        let more = futures::poll!(dec.next());
        assert!(more.is_pending(), "{more:?}");
        assert!(probe.is_unique(), "the decoder still holds the frame");
    }

    #[tokio::test]
    async fn a_cancelled_body_ends_the_stream_without_an_error() {
        let s = futures::stream::iter([Err::<Frame<Bytes>, _>(Status::cancelled("reset"))]);
        let got =
            Decoder::<WatchRequest>::new(Body::new(http_body_util::StreamBody::new(s)), 1024).collect::<Vec<_>>().await;
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn encode_refuses_what_is_over_the_limit() {
        let mut buf = BytesMut::new();
        let e = encode(&cancel(7), 1, &mut buf).expect_err("over the limit");
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        assert!(buf.is_empty());
        encode(&cancel(7), 1024, &mut buf).expect("encoded");
        assert_eq!(buf[0], 0);
        assert_eq!(u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize, buf.len() - HEADER);
    }
}

//! The gRPC codec: prost with small initial buffers for long-lived streams.
//!
//! tonic's default allocates an 8 KiB encode and an 8 KiB decode buffer for every
//! call and stream up front. With one watch stream per (project, resource), as
//! apiservers open them, that is most of a stream's memory: the buffers of Watch and
//! LeaseKeepAlive streams start at 256 B here (a watch create fits; `make mem-profile`
//! shows them per stream) and grow as a message needs. A unary
//! call's buffers live only as long as the call and start at tonic's 8 KiB, so a
//! Kubernetes object of a few KiB is read and written without growing (a copy)
//! each buffer on the way.

use std::any::TypeId;
use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Initial buffer size and the size after which an encoder yields: streams, unary calls.
const STREAMS: (usize, usize) = (256, 32 * 1024);
const UNARY: (usize, usize) = (8 * 1024, 32 * 1024);

/// The settings for a codec of `T` and `U`: [`STREAMS`] when either is a message of
/// a long-lived stream, else [`UNARY`].
fn sizes<T: 'static, U: 'static>() -> (usize, usize) {
    use crate::pb::etcdserverpb::{LeaseKeepAliveRequest, LeaseKeepAliveResponse, WatchRequest, WatchResponse};
    let streamed = [
        TypeId::of::<WatchRequest>(),
        TypeId::of::<WatchResponse>(),
        TypeId::of::<LeaseKeepAliveRequest>(),
        TypeId::of::<LeaseKeepAliveResponse>(),
    ];
    if streamed.contains(&TypeId::of::<T>()) || streamed.contains(&TypeId::of::<U>()) {
        STREAMS
    } else {
        UNARY
    }
}

fn settings<T: 'static, U: 'static>() -> BufferSettings {
    let (size, yield_at) = sizes::<T, U>();
    BufferSettings::new(size, yield_at)
}

/// `ProstCodec` with [`settings`]; the generated services and clients use it.
#[derive(Debug, Clone, Copy)]
pub struct EtcdCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for EtcdCodec<T, U> {
    fn default() -> Self {
        EtcdCodec(PhantomData)
    }
}

impl<T, U> Codec for EtcdCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings::<T, U>())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings::<T, U>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb::{RangeRequest, RangeResponse, WatchRequest, WatchResponse};

    #[test]
    fn streams_start_small_and_unary_calls_at_tonics_default() {
        assert_eq!(sizes::<WatchResponse, WatchRequest>(), STREAMS);
        assert_eq!(sizes::<RangeResponse, RangeRequest>(), UNARY);
    }
}

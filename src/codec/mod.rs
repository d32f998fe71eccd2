//! The gRPC codec: prost with small initial buffers, and ([`frame`]) gRPC's message
//! framing for the Watch stream, served without tonic's codec.
//!
//! tonic's default allocates an 8 KiB encode and an 8 KiB decode buffer for every
//! call and stream up front. With one watch stream per (project, resource), as
//! apiservers open them, that is most of a stream's memory. Buffers start empty
//! here and grow to the first message's size: an idle watch stream keeps ~180 B of
//! buffers instead of 512 (256 B each, the previous setting), and a call's first
//! allocation is the size it needs (`make mem-profile` shows them per stream).

pub mod frame;

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Initial buffer size and the size after which an encoder yields.
const SETTINGS: (usize, usize) = (0, 32 * 1024);

/// `ProstCodec` with [`SETTINGS`]; the generated services and clients use it.
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
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(SETTINGS.0, SETTINGS.1))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(SETTINGS.0, SETTINGS.1))
    }
}

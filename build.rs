//! Generates the etcd v3 gRPC server and client code from `proto/` with protoc
//! (Debian's `protobuf-compiler`, installed by `make deps`). Every `bytes` field
//! becomes `bytes::Bytes`, so keys and values are shared rather than copied.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .bytes(".")
        // Small initial buffers per call and stream (src/codec.rs).
        .codec_path("crate::codec::EtcdCodec")
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[
                "proto/etcd/api/etcdserverpb/rpc.proto",
                "proto/etcd/api/mvccpb/kv.proto",
                "proto/etcd/api/authpb/auth.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}

//! Generates the gRPC baseline's code with a protoc that ships inside a crate,
//! so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; this only informs prost-build.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        // bytes::Bytes fields: tonic decodes payloads without an extra copy, a fair baseline.
        .bytes(".")
        .compile_protos(&["proto/bench.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/bench.proto");
    Ok(())
}

//! Compiles `respwatch/v1/*.proto` with the pure-Rust `protox` compiler (no protoc needed),
//! generates the tonic client and server, and writes the file descriptor set for reflection.
use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> anyhow::Result<()> {
    let proto = "respwatch/v1/respwatch.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("respwatch_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

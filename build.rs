//! Compiles `proto/tern/v1/*.proto` with protox (pure Rust), so no system protoc is needed.
//! Also writes the Console service's file descriptor set (console.proto and
//! what it imports) for server reflection: the Peer service is between agents
//! and is not advertised.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tern/v1/cookies.proto",
        "proto/tern/v1/peer.proto",
        "proto/tern/v1/console.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    let console = protox::Compiler::new(["proto"])?
        .include_source_info(true)
        .include_imports(true)
        .open_files(["proto/tern/v1/console.proto"])?
        .encode_file_descriptor_set();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("console_descriptor.bin"), console)?;
    Ok(())
}

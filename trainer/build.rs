// Generates the exchange's gRPC code with a vendored protoc, so a build needs no protoc on
// the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the env.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().compile_protos(&["proto/exchange.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/exchange.proto");
    Ok(())
}

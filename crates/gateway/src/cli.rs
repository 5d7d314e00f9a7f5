//! Command line.

/// Entry point of the `bulwark` binary.
pub fn main() -> std::process::ExitCode {
    eprintln!("bulwark: the gateway is not built yet");
    std::process::ExitCode::FAILURE
}

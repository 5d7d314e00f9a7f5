//! `bulwark`: the gateway binary.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    bulwark_gateway::cli::main()
}

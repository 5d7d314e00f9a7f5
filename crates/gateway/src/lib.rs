//! The bulwark gateway: a resilience reverse proxy driven by one YAML file.
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub)]

pub mod admin;
pub mod admission;
pub mod chaos;
mod chunked;
pub mod cli;
pub mod config;
pub mod demo;
mod pem;
pub mod policy;
pub mod proxy;
pub mod reload;
mod sched;
pub mod store;
pub mod upstream;

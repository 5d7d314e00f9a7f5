//! The real gateway behind the demo: the same code `bulwark run` serves with, in this process.

use std::path::PathBuf;

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::DemoGateway;
use crate::cli::Running;

/// Runs the gateway in this process, on the current runtime: proxy, admin listener and reloader,
/// exactly as `bulwark run` starts them.
#[derive(Debug, Default)]
pub struct InProcessGateway {
    running: Option<Running>,
}

impl DemoGateway for InProcessGateway {
    fn start(&mut self, config: PathBuf) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let cfg = crate::config::load(&config).map_err(|e| e.to_string())?;
            // SIGHUP is the demo's (its terminal closed), not a reload of a generated file.
            let running = crate::cli::start_with(&config, &cfg, Duration::from_secs(1), None)
                .await
                .map_err(|e| e.to_string())?;
            self.running = Some(running);
            Ok(())
        })
    }

    fn shutdown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(r) = self.running.take() {
                r.stop().await;
            }
        })
    }
}

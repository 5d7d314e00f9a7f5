//! The real gateway behind the demo: the same code `bulwark run` serves with, in this process.

use std::path::PathBuf;

use futures_util::future::BoxFuture;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::DemoGateway;

/// Runs the gateway in this process, on the current runtime.
#[derive(Debug, Default)]
pub struct InProcessGateway {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl DemoGateway for InProcessGateway {
    fn start(&mut self, config: PathBuf) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let cfg = crate::config::load(&config).map_err(|e| e.to_string())?;
            let server = crate::proxy::Server::bind(&cfg)
                .await
                .map_err(|e| e.to_string())?;
            let (stop, stopped) = oneshot::channel::<()>();
            self.stop = Some(stop);
            self.task = Some(tokio::spawn(server.run(async move {
                let _ = stopped.await;
            })));
            Ok(())
        })
    }

    fn shutdown(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(s) = self.stop.take() {
                let _ = s.send(());
            }
            if let Some(t) = self.task.take() {
                let _ = t.await;
            }
        })
    }
}

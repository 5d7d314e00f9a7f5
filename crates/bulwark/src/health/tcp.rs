//! A check that a TCP connection can be opened.

use std::fmt;
use std::time::Duration;

use tokio::net::TcpStream;

use super::{CheckFuture, CheckResult, HealthCheck};

/// How long a [`TcpCheck`] waits for a connection by default: a dependency on the
/// same network that takes longer than this to accept is not healthy.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Healthy when a TCP connection to `addr` opens within the timeout; the connection
/// is closed at once.
///
/// `addr` is resolved on every check (`host:port` or `ip:port`), so a DNS change is
/// followed; the resolution counts against the timeout.
///
/// ```
/// use bulwark::health::{HealthCheck, HealthStatus, TcpCheck};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// let check = TcpCheck::new("upstream", listener.local_addr().unwrap().to_string());
/// assert_eq!(check.check().await.status, HealthStatus::Healthy);
/// # }
/// ```
#[derive(Clone)]
pub struct TcpCheck {
    name: String,
    addr: String,
    timeout: Duration,
}

impl fmt::Debug for TcpCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpCheck")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl TcpCheck {
    /// A check named `name` connecting to `addr`, with [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn new(name: impl Into<String>, addr: impl Into<String>) -> Self {
        TcpCheck {
            name: name.into(),
            addr: addr.into(),
            timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Sets the connect timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The address checked.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl HealthCheck for TcpCheck {
    fn name(&self) -> &str {
        &self.name
    }

    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, TcpStream::connect(self.addr.as_str())).await {
                Ok(Ok(_stream)) => CheckResult::healthy(),
                Ok(Err(e)) => CheckResult::unhealthy(format!("connect to {}: {e}", self.addr)),
                Err(_) => CheckResult::unhealthy(format!(
                    "connect to {}: timed out after {:?}",
                    self.addr, self.timeout
                )),
            }
        })
    }
}

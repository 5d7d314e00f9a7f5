//! The bulwark gateway: a resilience reverse proxy driven by one YAML file.
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub)]

/// `AsyncWrite` for a wrapper that only watches or replays reads (`$t<I>`, its stream in `io`):
/// every write goes straight through.
macro_rules! write_through {
    ($t:ident) => {
        impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $t<I> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
            }
        }
    };
}

pub mod admin;
pub mod admission;
pub mod chaos;
mod chunked;
pub mod cli;
pub mod config;
pub mod demo;
mod h2frame;
mod pem;
pub mod policy;
pub mod proxy;
pub mod reload;
mod sched;
pub mod store;
pub mod upstream;

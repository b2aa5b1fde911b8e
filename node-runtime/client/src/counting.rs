//! What a client costs on the wire: requests, and bytes written and read, counted on every
//! connection (below TLS, so handshakes count too).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Counters shared by a client and its clones.
#[derive(Debug, Default)]
pub struct WireStats {
    requests: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    /// Highest digests version the node answered with (its `x-hyperbox-digests-version`).
    digests_version: AtomicU64,
}

/// A reading of [`WireStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireTotals {
    pub requests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl WireTotals {
    pub fn plus(self, o: WireTotals) -> WireTotals {
        WireTotals {
            requests: self.requests + o.requests,
            bytes_sent: self.bytes_sent + o.bytes_sent,
            bytes_received: self.bytes_received + o.bytes_received,
        }
    }
}

impl WireStats {
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn saw_digests_version(&self, v: u64) {
        self.digests_version.fetch_max(v, Ordering::Relaxed);
    }

    pub fn digests_version(&self) -> u64 {
        self.digests_version.load(Ordering::Relaxed)
    }

    /// Forget higher versions: the node restarted with a lower one.
    pub fn reset_digests_version(&self, v: u64) {
        self.digests_version.store(v, Ordering::Relaxed);
    }

    pub fn totals(&self) -> WireTotals {
        WireTotals {
            requests: self.requests.load(Ordering::Relaxed),
            bytes_sent: self.sent.load(Ordering::Relaxed),
            bytes_received: self.received.load(Ordering::Relaxed),
        }
    }
}

/// A stream that adds what passes through it to [`WireStats`].
pub struct Counting<S> {
    inner: S,
    stats: Arc<WireStats>,
}

impl<S> Counting<S> {
    pub fn new(inner: S, stats: Arc<WireStats>) -> Counting<S> {
        Counting { inner, stats }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.stats.received.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.stats.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.stats.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_directions() {
        let (a, mut b) = tokio::io::duplex(64);
        let stats = Arc::new(WireStats::default());
        let mut c = Counting::new(a, stats.clone());
        c.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        b.write_all(b"abc").await.unwrap();
        let mut back = [0u8; 3];
        c.read_exact(&mut back).await.unwrap();
        let t = stats.totals();
        assert_eq!((t.bytes_sent, t.bytes_received), (5, 3));
    }
}

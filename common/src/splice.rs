//! Copying bytes both ways between two streams, with half-close and lean idle memory.
//!
//! [`splice`] forwards each direction until its reader reaches end of stream, then shuts down the
//! other side's write half (a half-close: the peer sees EOF, and can still answer). It returns when
//! both directions are done, or at the first error (the caller then fails both sides loudly).
//!
//! Idle connections hold no copy buffer: a buffer is taken from a small per-thread pool only for
//! the moment a read can complete, and given back as soon as its bytes are written. With
//! thousands of idle tunneled connections this is most of the memory a connection would cost.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of one copy buffer.
const BUF_SIZE: usize = 32 * 1024;
/// Buffers kept per thread for reuse.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buf(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    });
}

/// Byte counts of a finished splice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes copied from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes copied from `b` to `a`.
    pub b_to_a: u64,
}

/// A splice that failed: why, and how many bytes each way had been delivered by then (for the
/// audit record of a connection that ended badly).
#[derive(Debug)]
pub struct SpliceError {
    /// The first error, on either side.
    pub error: io::Error,
    /// Bytes written to the other side before it.
    pub transferred: Transferred,
}

impl std::fmt::Display for SpliceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for SpliceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions end.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> Result<Transferred, SpliceError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ab = Direction::default();
    let mut ba = Direction::default();
    let done = poll_fn(|cx| {
        let r1 = ab.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let r2 = ba.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (r1, r2) {
            (Poll::Ready(_), Poll::Ready(_)) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await;
    let transferred = Transferred {
        a_to_b: ab.amt,
        b_to_a: ba.amt,
    };
    match done {
        Ok(()) => Ok(transferred),
        Err(error) => Err(SpliceError { error, transferred }),
    }
}

#[derive(Default)]
struct Direction {
    buf: Option<Box<[u8]>>,
    pos: usize,
    cap: usize,
    amt: u64,
    read_done: bool,
    need_flush: bool,
    done: bool,
}

impl Direction {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.amt));
        }
        loop {
            if self.pos == self.cap && !self.read_done {
                let mut buf = self.buf.take().unwrap_or_else(take_buf);
                let mut rb = ReadBuf::new(&mut buf);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        // Nothing was read, so the buffer holds nothing: give it back while idle.
                        give_buf(buf);
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => {
                        give_buf(buf);
                        return Poll::Ready(Err(e));
                    }
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                            give_buf(buf);
                        } else {
                            self.pos = 0;
                            self.cap = n;
                            self.buf = Some(buf);
                        }
                    }
                }
            }
            while self.pos < self.cap {
                let buf = self.buf.as_ref().expect("a buffer holds unwritten bytes");
                let n = ready!(writer.as_mut().poll_write(cx, &buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.amt += n as u64;
                self.need_flush = true;
            }
            if let Some(buf) = self.buf.take() {
                give_buf(buf);
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.amt));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn copies_both_ways_and_propagates_half_close() {
        let (mut client, mut a) = duplex(64);
        let (mut b, mut server) = duplex(64);
        let task = tokio::spawn(async move { splice(&mut a, &mut b).await });

        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let send = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&send).await.unwrap();
            // Half-close: the server must see EOF and still be able to answer.
            client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
        let t = task.await.unwrap().unwrap();
        assert_eq!(t.a_to_b, payload.len() as u64);
        assert_eq!(t.b_to_a, 4);
    }

    /// Gives `data`, then fails with a reset; takes whatever is written.
    struct ThenReset {
        data: Vec<u8>,
        written: usize,
    }

    impl AsyncRead for ThenReset {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.data.is_empty() {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            let n = self.data.len().min(buf.remaining());
            buf.put_slice(&self.data[..n]);
            self.data.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for ThenReset {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written += buf.len();
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_failure_reports_what_was_delivered_before_it() {
        let mut a = ThenReset {
            data: vec![7; 100_000],
            written: 0,
        };
        let (mut b, mut far) = duplex(1 << 20);
        far.write_all(b"hello").await.unwrap();
        let e = splice(&mut a, &mut b).await.unwrap_err();
        assert_eq!(e.error.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(e.to_string(), e.error.to_string());
        assert_eq!(e.transferred.a_to_b, 100_000);
        assert_eq!(e.transferred.b_to_a, a.written as u64);
        let mut got = vec![0; 100_000];
        far.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&x| x == 7));
    }
}

//! Async reading and writing of [`crate::protocol`] frames.
//!
//! Reads are exact (a 4-byte prefix, then exactly the body), so no byte that follows a frame is
//! ever consumed here: after the [`Answer`](crate::protocol::Answer) of a data stream, the raw
//! bytes that follow stay in the stream for the splice.

use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{self, FrameError, MAGIC};

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The bytes were not valid protocol.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes the stream magic followed by one frame, in one write.
pub async fn write_first<W, T>(w: &mut W, msg: &T) -> Result<(), WireError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut buf = BytesMut::with_capacity(128);
    buf.extend_from_slice(&MAGIC);
    protocol::encode(msg, &mut buf)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Writes one frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), WireError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut buf = BytesMut::with_capacity(128);
    protocol::encode(msg, &mut buf)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads and checks the stream magic, then reads one frame.
pub async fn read_first<R, T>(r: &mut R) -> Result<T, WireError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut magic = [0u8; 4];
    read_exact(r, &mut magic).await?;
    protocol::check_magic(magic)?;
    read_frame(r).await
}

/// Reads one frame.
pub async fn read_frame<R, T>(r: &mut R) -> Result<T, WireError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut prefix = [0u8; 4];
    read_exact(r, &mut prefix).await?;
    let len = protocol::frame_len(&prefix)?.unwrap_or(0);
    let mut body = vec![0u8; len];
    read_exact(r, &mut body).await?;
    Ok(protocol::decode_body(&body)?)
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), WireError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(WireError::Frame(FrameError::Truncated))
        }
        Err(e) => Err(WireError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Answer, Open};

    #[tokio::test]
    async fn frames_leave_following_bytes_in_the_stream() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_first(
            &mut a,
            &Answer::Ok {
                backend: "x".into(),
            },
        )
        .await
        .unwrap();
        a.write_all(b"raw bytes").await.unwrap();
        drop(a);
        let got: Answer = read_first(&mut b).await.unwrap();
        assert_eq!(
            got,
            Answer::Ok {
                backend: "x".into()
            }
        );
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"raw bytes");
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(matches!(
            read_first::<_, Open>(&mut b).await,
            Err(WireError::Frame(FrameError::BadMagic(_)))
        ));
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"PSTN\x00\x00\x00\x10{").await.unwrap();
        drop(a);
        assert!(matches!(
            read_first::<_, Open>(&mut b).await,
            Err(WireError::Frame(FrameError::Truncated))
        ));
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"PSTN\xff\xff\xff\xff").await.unwrap();
        assert!(matches!(
            read_first::<_, Open>(&mut b).await,
            Err(WireError::Frame(FrameError::TooLarge(_)))
        ));
    }
}

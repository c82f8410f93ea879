//! Bounds-checked reading and writing of the MySQL wire's basic types.
//!
//! Integers are little-endian. Strings are either NUL-terminated or "length-encoded": a
//! length-encoded integer (one byte below `0xfb`; `0xfc` + u16; `0xfd` + u24; `0xfe` + u64)
//! followed by that many bytes. Every read returns an error instead of panicking when the
//! payload is too short, because every payload here comes from a peer.

use bytes::{BufMut, Bytes};

use super::MysqlError;

/// A cursor over a payload that names what it is reading in its errors.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    start_len: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self {
            buf,
            start_len: buf.len(),
            what,
        }
    }

    /// How far into the payload the cursor is.
    pub(super) fn pos(&self) -> usize {
        self.start_len - self.buf.len()
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(super) fn truncated(&self) -> MysqlError {
        MysqlError::Truncated(self.what)
    }

    pub(super) fn malformed(&self, why: &'static str) -> MysqlError {
        MysqlError::Malformed {
            what: self.what,
            why,
        }
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], MysqlError> {
        let (head, tail) = self.buf.split_at_checked(n).ok_or(self.truncated())?;
        self.buf = tail;
        Ok(head)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], MysqlError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(super) fn u8(&mut self) -> Result<u8, MysqlError> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    pub(super) fn u16(&mut self) -> Result<u16, MysqlError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(super) fn u32(&mut self) -> Result<u32, MysqlError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Everything up to the next NUL, which is consumed and not returned.
    pub(super) fn nul_terminated(&mut self) -> Result<&'a [u8], MysqlError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(self.truncated())?;
        let s = self.take(end)?;
        self.take(1)?;
        Ok(s)
    }

    /// Like [`Reader::nul_terminated`], but a string that runs to the end of the payload
    /// without its NUL is accepted: some clients and servers omit the last terminator.
    pub(super) fn nul_terminated_or_rest(&mut self) -> &'a [u8] {
        match self.nul_terminated() {
            Ok(s) => s,
            Err(_) => self.rest(),
        }
    }

    pub(super) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(super) fn lenenc_int(&mut self) -> Result<u64, MysqlError> {
        match self.u8()? {
            b @ 0..=0xfa => Ok(u64::from(b)),
            0xfc => Ok(u64::from(self.u16()?)),
            0xfd => {
                let [a, b, c] = self.array()?;
                Ok(u64::from(u32::from_le_bytes([a, b, c, 0])))
            }
            0xfe => Ok(u64::from_le_bytes(self.array()?)),
            // 0xfb is NULL in result rows and 0xff starts an ERR packet; neither is a length.
            _ => Err(self.malformed("invalid length-encoded integer")),
        }
    }

    pub(super) fn lenenc_bytes(&mut self) -> Result<&'a [u8], MysqlError> {
        let len = self.lenenc_int()?;
        let len = usize::try_from(len).map_err(|_| self.truncated())?;
        self.take(len)
    }
}

/// Copies a slice of a peer's payload into an owned field.
pub(super) fn owned(s: &[u8]) -> Bytes {
    Bytes::copy_from_slice(s)
}

pub(super) fn put_lenenc_int(out: &mut impl BufMut, v: u64) {
    match v {
        0..0xfb => out.put_u8(v as u8),
        0xfb..0x1_0000 => {
            out.put_u8(0xfc);
            out.put_u16_le(v as u16);
        }
        0x1_0000..0x100_0000 => {
            out.put_u8(0xfd);
            out.put_slice(&v.to_le_bytes()[..3]);
        }
        _ => {
            out.put_u8(0xfe);
            out.put_u64_le(v);
        }
    }
}

pub(super) fn put_lenenc_bytes(out: &mut impl BufMut, b: &[u8]) {
    put_lenenc_int(out, b.len() as u64);
    out.put_slice(b);
}

pub(super) fn put_nul_terminated(out: &mut impl BufMut, b: &[u8]) {
    out.put_slice(b);
    out.put_u8(0);
}

/// Length-encoded key/value pairs, as in the connection attributes of a handshake response or
/// `COM_CHANGE_USER`.
pub(super) fn read_attributes(block: &[u8]) -> Result<Vec<(Bytes, Bytes)>, MysqlError> {
    let mut r = Reader::new(block, "connection attributes");
    let mut pairs = Vec::new();
    while !r.is_empty() {
        let key = r.lenenc_bytes()?;
        let value = r.lenenc_bytes()?;
        pairs.push((owned(key), owned(value)));
    }
    Ok(pairs)
}

pub(super) fn put_attributes(out: &mut impl BufMut, pairs: &[(Bytes, Bytes)]) {
    let mut block = Vec::new();
    for (k, v) in pairs {
        put_lenenc_bytes(&mut block, k);
        put_lenenc_bytes(&mut block, v);
    }
    put_lenenc_bytes(out, &block);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenenc_boundaries_roundtrip() {
        for v in [
            0u64,
            0xfa,
            0xfb,
            0xffff,
            0x1_0000,
            0xff_ffff,
            0x100_0000,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_lenenc_int(&mut out, v);
            let mut r = Reader::new(&out, "test");
            assert_eq!(r.lenenc_int().unwrap(), v);
            assert!(r.is_empty());
        }
    }

    #[test]
    fn short_reads_are_errors() {
        let mut r = Reader::new(&[0xfc, 1], "test");
        assert!(matches!(r.lenenc_int(), Err(MysqlError::Truncated("test"))));
        let mut r = Reader::new(&[0xfe, 1, 2, 3], "test");
        assert!(r.lenenc_bytes().is_err());
        let mut r = Reader::new(b"abc", "test");
        assert!(r.nul_terminated().is_err());
        assert_eq!(r.nul_terminated_or_rest(), b"abc");
        // A length that does not fit in memory is an error, not an allocation.
        let mut r = Reader::new(
            &[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            "test",
        );
        assert!(r.lenenc_bytes().is_err());
    }
}

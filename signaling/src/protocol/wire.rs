//! Varints and length-prefixed strings, the building blocks of frames and batches.
use bytes::{BufMut, BytesMut};

use super::codec::CodecError;

pub(super) fn put_varint(buf: &mut BytesMut, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            buf.put_u8(byte);
            return;
        }
        buf.put_u8(byte | 0x80);
    }
}

pub(super) fn put_str8(buf: &mut BytesMut, s: &str, what: &'static str) -> Result<(), CodecError> {
    let len = u8::try_from(s.len()).map_err(|_| CodecError::TooLong(what))?;
    buf.put_u8(len);
    buf.put_slice(s.as_bytes());
    Ok(())
}

pub(super) struct Reader<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn u8(&mut self) -> Result<u8, CodecError> {
        let b = *self.buf.get(self.pos).ok_or(CodecError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }
    pub(super) fn varint(&mut self) -> Result<u64, CodecError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            let part = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(CodecError::Varint);
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError::Varint)
    }
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).ok_or(CodecError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(CodecError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    pub(super) fn str8(&mut self, what: &'static str) -> Result<&'a str, CodecError> {
        let n = usize::from(self.u8()?);
        std::str::from_utf8(self.take(n)?).map_err(|_| CodecError::Utf8(what))
    }
    pub(super) fn str_var(&mut self, what: &'static str) -> Result<&'a str, CodecError> {
        let n = usize::try_from(self.varint()?).map_err(|_| CodecError::TooLong(what))?;
        std::str::from_utf8(self.take(n)?).map_err(|_| CodecError::Utf8(what))
    }
}

//! Framing of regular (tagged) messages in both directions: one type byte, an i32 length that
//! counts itself, then the body. A frame keeps its raw bytes so relaying it is a plain copy.

use bytes::{Bytes, BytesMut};

use super::ProtocolError;

/// One complete message, header included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    raw: Bytes,
}

impl Frame {
    /// Wraps raw bytes that [`decode`] produced (or a caller encoded).
    pub fn from_raw(raw: Bytes) -> Frame {
        Frame { raw }
    }

    /// The same frame in an allocation of its own: a frame kept for long must not pin the
    /// (possibly much larger) read buffer [`decode`] cut it from.
    pub fn detached(&self) -> Frame {
        Frame {
            raw: Bytes::copy_from_slice(&self.raw),
        }
    }

    /// Encodes a message with `tag` and `body` (for messages the proxy makes itself, and tests).
    pub fn new(tag: u8, body: &[u8]) -> Frame {
        let mut raw = BytesMut::with_capacity(body.len() + 5);
        super::write_msg(&mut raw, tag, |b| b.extend_from_slice(body));
        Frame { raw: raw.freeze() }
    }

    /// The type byte.
    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The body after the length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }

    /// The whole message as it goes on the wire.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
}

/// Takes one complete message off the front of `buf`; `Ok(None)` means more bytes are needed.
/// A length over `max` is refused before any of the body is buffered, so a peer cannot make the
/// proxy allocate what it announces.
pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength(len as i64));
    }
    let total = len as usize + 1;
    if total > max {
        return Err(ProtocolError::TooLarge {
            len: len as usize,
            max,
        });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame {
        raw: buf.split_to(total).freeze(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_partial_and_back_to_back_frames() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x08abc\0Z\0\0\0\x05I"[..]);
        let f = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(f.tag(), b'Q');
        assert_eq!(f.body(), b"abc\0");
        let f = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((f.tag(), f.body()), (b'Z', &b"I"[..]));
        assert!(buf.is_empty());
        let mut part = BytesMut::from(&b"Q\0\0"[..]);
        assert_eq!(decode(&mut part, 1024).unwrap(), None);
        part.extend_from_slice(b"\0\x08ab");
        assert_eq!(decode(&mut part, 1024).unwrap(), None);
        part.extend_from_slice(b"c\0");
        assert!(decode(&mut part, 1024).unwrap().is_some());
    }

    #[test]
    fn a_detached_frame_does_not_share_the_read_buffer() {
        let mut buf = BytesMut::with_capacity(1 << 20);
        buf.extend_from_slice(b"P\0\0\0\x08s\0\0\0");
        let f = decode(&mut buf, 1024).unwrap().unwrap();
        let d = f.detached();
        assert_eq!(d, f);
        let (start, len) = (f.raw().as_ptr() as usize, 1 << 20);
        let at = d.raw().as_ptr() as usize;
        assert!(at < start || at >= start + len, "a copy outside the 1 MiB buffer");
    }

    #[test]
    fn a_made_frame_decodes_as_itself() {
        let f = Frame::new(b'Q', b"abc\0");
        let mut buf = BytesMut::from(&f.raw()[..]);
        assert_eq!(decode(&mut buf, 64).unwrap(), Some(f));
    }

    #[test]
    fn bad_and_oversized_lengths_are_refused() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x03"[..]);
        assert_eq!(decode(&mut buf, 1024), Err(ProtocolError::BadLength(3)));
        let mut buf = BytesMut::from(&b"Q\xff\xff\xff\xff"[..]);
        assert_eq!(decode(&mut buf, 1024), Err(ProtocolError::BadLength(-1)));
        let mut buf = BytesMut::from(&b"Q\x7f\xff\xff\xff"[..]);
        assert!(matches!(
            decode(&mut buf, 1024),
            Err(ProtocolError::TooLarge { .. })
        ));
        // Nothing of the announced size was reserved.
        assert!(buf.capacity() < 1024);
    }
}

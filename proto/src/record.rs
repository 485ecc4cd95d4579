//! Small helpers for the binary records that `meterd` and `backoffice` keep
//! in their stores, and for hex: length-prefixed strings, big-endian
//! integers, a reader that answers `None` at any inconsistency (callers treat
//! that as corruption). No I/O.

/// Appends `text` with a one-byte length (at most 255 bytes).
pub fn put_str(out: &mut Vec<u8>, text: &str) {
    let len = u8::try_from(text.len()).expect("stored strings are at most 255 bytes");
    out.push(len);
    out.extend_from_slice(text.as_bytes());
}

/// Reads fields off a record in order.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A reader over `record`.
    pub fn new(record: &'a [u8]) -> Self {
        Self(record)
    }

    /// The next `count` bytes.
    pub fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if self.0.len() < count {
            return None;
        }
        let (head, rest) = self.0.split_at(count);
        self.0 = rest;
        Some(head)
    }

    /// One byte.
    pub fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A big-endian i128.
    pub fn i128(&mut self) -> Option<i128> {
        Some(i128::from_be_bytes(self.take(16)?.try_into().ok()?))
    }

    /// A string written by `put_str`.
    pub fn text(&mut self) -> Option<&'a str> {
        let len = usize::from(self.byte()?);
        std::str::from_utf8(self.take(len)?).ok()
    }

    /// True when every byte was read.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// The bytes of lower-case hex `text` of exactly `len` bytes.
pub fn unhex(text: &str, len: usize) -> Option<Vec<u8>> {
    if text.len() != len * 2 {
        return None;
    }
    let digit = |byte: u8| match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        _ => None,
    };
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back_and_truncation_is_detected() {
        let mut record = Vec::new();
        record.push(7);
        record.extend_from_slice(&5u64.to_be_bytes());
        put_str(&mut record, "B1-C1");
        let mut reader = Reader::new(&record);
        assert_eq!(
            (reader.byte(), reader.u64(), reader.text()),
            (Some(7), Some(5), Some("B1-C1"))
        );
        assert!(reader.is_empty());
        let mut short = Reader::new(&record[..record.len() - 1]);
        assert_eq!(
            (short.byte(), short.u64(), short.text()),
            (Some(7), Some(5), None)
        );
    }

    #[test]
    fn hex_round_trips_and_refuses_bad_digits() {
        assert_eq!(hex(&[0, 171, 255]), "00abff");
        assert_eq!(unhex("00abff", 3), Some(vec![0, 171, 255]));
        assert_eq!(unhex("00ABFF", 3), None);
        assert_eq!(unhex("00ab", 3), None);
    }
}

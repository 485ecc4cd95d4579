//! `send` bodies exactly as `encode_call` writes them, decoded by matching
//! bytes: the meter's own uploads, at memory speed.
//!
//! The canonical form has no whitespace between elements, no comments, CDATA,
//! character or entity references, and every string in a `<string>` element;
//! all its text is printable ASCII without `&`, `<` or `>`. For such a body
//! the XML parser would produce exactly the text between the tags, so the
//! result equals the general decoder's. Anything else, a single space
//! included, makes this return `None` and the caller tries the next decoder.

use super::stream::{ReadingFields, Scalar};
use super::{BATCH_PARTIES_MAX, BATCH_READINGS_MAX, Batch, SEND_METHOD, SendBody, SendRequest};
use crate::id::{BatchId, Mid, Payer};
use crate::reading::Reading;
use crate::xmlrpc::Limits;

struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Consumes `literal` if the body continues with it.
    fn eat(&mut self, literal: &[u8]) -> bool {
        match self.rest.strip_prefix(literal) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn expect(&mut self, literal: &[u8]) -> Option<()> {
        self.eat(literal).then_some(())
    }

    /// Text up to the next `<`, which must be printable ASCII other than
    /// `&` and `>`.
    fn text(&mut self) -> Option<&'a str> {
        let end = memchr::memchr(b'<', self.rest)?;
        let (text, rest) = self.rest.split_at(end);
        if !text
            .iter()
            .all(|&b| (b' '..=b'~').contains(&b) && b != b'&' && b != b'>')
        {
            return None;
        }
        self.rest = rest;
        std::str::from_utf8(text).ok()
    }

    /// `<value><string>TEXT</string></value>`.
    fn string_value(&mut self) -> Option<&'a str> {
        self.expect(b"<value><string>")?;
        let text = self.text()?;
        self.expect(b"</string></value>")?;
        Some(text)
    }

    /// `<member><name>NAME</name>`, or `None` when the struct ends here.
    fn member_name(&mut self) -> Option<&'a str> {
        if !self.eat(b"<member><name>") {
            return None;
        }
        let name = self.text()?;
        self.expect(b"</name>")?;
        Some(name)
    }
}

/// Decodes `body` when it is a canonical extended-form `send` call.
pub fn decode(body: &[u8], limits: Limits) -> Option<SendRequest> {
    if body.len() > limits.body_bytes_max || limits.depth_max < 3 {
        return None;
    }
    let mut c = Cursor { rest: body };
    c.eat(b"<?xml version=\"1.0\"?>");
    c.expect(b"<methodCall><methodName>")?;
    if c.text()? != SEND_METHOD {
        return None;
    }
    c.expect(b"</methodName><params><param>")?;
    let mid: Mid = c.string_value()?.parse().ok()?;
    c.expect(b"</param><param><value><struct>")?;
    let mut id = None;
    let mut readings = None;
    let mut parties = None;
    while let Some(name) = c.member_name() {
        match name {
            "batchId" if id.is_none() => id = Some(BatchId::parse(c.string_value()?).ok()?),
            "readings" if readings.is_none() => readings = Some(reading_array(&mut c)?),
            "packedReadings" if readings.is_none() => readings = Some(packed_readings(&mut c)?),
            "parties" if parties.is_none() => parties = Some(party_array(&mut c)?),
            _ => return None,
        }
        c.expect(b"</member>")?;
    }
    c.expect(b"</struct></value></param></params></methodCall>")?;
    if !c.rest.is_empty() {
        return None;
    }
    Some(SendRequest {
        mid,
        body: SendBody::Batch(Batch {
            id: id?,
            readings: readings?,
            parties: parties.unwrap_or_default(),
        }),
    })
}

fn reading_array(c: &mut Cursor<'_>) -> Option<Vec<Reading>> {
    c.expect(b"<value><array><data>")?;
    // Room for as many readings as the rest of the body could hold (none is
    // shorter than 256 bytes in this form), so that a 10,000-reading batch
    // is not copied as it grows; never more than a batch may have.
    let mut readings: Vec<Reading> =
        Vec::with_capacity((c.rest.len() / 256).min(BATCH_READINGS_MAX));
    while c.eat(b"<value><struct>") {
        if readings.len() == BATCH_READINGS_MAX {
            return None;
        }
        let mut fields = ReadingFields::default();
        while let Some(name) = c.member_name() {
            fields.set(name, Scalar::Text(c.string_value()?.into()))?;
            c.expect(b"</member>")?;
        }
        c.expect(b"</struct></value>")?;
        let reading = fields.reading()?;
        if readings.last().is_some_and(|last| reading.seq <= last.seq) {
            return None;
        }
        readings.push(reading);
    }
    c.expect(b"</data></array></value>")?;
    Some(readings)
}

/// `<value><base64>BLOCK</base64></value>`, the block without whitespace.
fn packed_readings(c: &mut Cursor<'_>) -> Option<Vec<Reading>> {
    use base64::Engine as _;
    c.expect(b"<value><base64>")?;
    let text = c.text()?;
    c.expect(b"</base64></value>")?;
    let block = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    super::packed::decode(&block).ok()
}

fn party_array(c: &mut Cursor<'_>) -> Option<Vec<Payer>> {
    c.expect(b"<value><array><data>")?;
    let mut parties = Vec::new();
    while c.rest.starts_with(b"<value>") {
        if parties.len() == BATCH_PARTIES_MAX {
            return None;
        }
        parties.push(Payer::parse(c.string_value()?).ok()?);
    }
    c.expect(b"</data></array></value>")?;
    Some(parties)
}

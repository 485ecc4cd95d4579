//! The XML-RPC parser: bytes in, `MethodCall` or `MethodResponse` out.
//!
//! Bounded before it starts (body size) and while it runs (nesting depth). It
//! refuses any DOCTYPE, so no DTD is read and no entity is ever defined or
//! expanded: only the five predefined entities and character references are
//! resolved. Errors carry a byte offset and what was expected, never any text
//! of the input, so a fault cannot echo a hostile body back.

use std::borrow::Cow;

use base64::Engine as _;
use quick_xml::Reader;
use quick_xml::events::Event;

use super::Limits;
use super::value::{Member, MethodCall, MethodResponse, Value};
use crate::fault::Fault;

/// Why a body is not an acceptable XML-RPC message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The body is larger than the limit; nothing of it was parsed.
    #[error("request of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size of the body in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// Arrays and structs are nested deeper than the limit.
    #[error("values nested deeper than {max} levels")]
    TooDeep {
        /// The limit in levels.
        max: usize,
    },
    /// The body is not valid UTF-8.
    #[error("body is not UTF-8 (at byte {offset})")]
    NotUtf8 {
        /// Byte offset of the first byte that is not valid UTF-8.
        offset: u64,
    },
    /// The body is not well-formed XML.
    #[error("body is not well-formed XML (at byte {offset})")]
    Xml {
        /// Byte offset where the XML parser stopped.
        offset: u64,
    },
    /// The body has a document type declaration, which is never accepted.
    #[error("DOCTYPE is not allowed (at byte {offset})")]
    Doctype {
        /// Byte offset of the declaration.
        offset: u64,
    },
    /// An entity other than the five predefined ones, or a bad character reference.
    #[error("unknown entity or bad character reference (at byte {offset})")]
    UnknownEntity {
        /// Byte offset of the reference.
        offset: u64,
    },
    /// Well-formed XML that is not the XML-RPC structure expected.
    #[error("not a valid XML-RPC message: expected {expected} (at byte {offset})")]
    Structure {
        /// What the parser expected at this point.
        expected: &'static str,
        /// Byte offset where it was not found.
        offset: u64,
    },
    /// A scalar whose text is not a valid value of its type.
    #[error("invalid {kind} value (at byte {offset})")]
    BadScalar {
        /// The XML-RPC type.
        kind: &'static str,
        /// Byte offset of the end of the value.
        offset: u64,
    },
    /// A struct with two members of the same name.
    #[error("struct has a duplicate member name (at byte {offset})")]
    DuplicateMember {
        /// Byte offset of the end of the struct.
        offset: u64,
    },
}

/// Parses a `<methodCall>` body within `limits`.
pub fn parse_call(body: &[u8], limits: Limits) -> Result<MethodCall, CodecError> {
    let mut parser = Parser::new(body, limits)?;
    let name = parser.method_name()?;
    let mut params = Vec::new();
    match parser.structural("<params> or </methodCall>")? {
        Token::Open(Tag::Params) => {
            params = parser.params()?;
            parser.expect_close("</methodCall>")?;
        }
        Token::Close => {}
        _ => return Err(parser.structure("<params> or </methodCall>")),
    }
    parser.expect_eof()?;
    Ok(MethodCall { name, params })
}

/// The method name of a `<methodCall>` body, read without parsing the rest,
/// so that a server can hand the whole body to the method's own decoder.
/// Fails as `parse_call` would on the same prefix; the rest is not checked.
pub fn method_name(body: &[u8], limits: Limits) -> Result<String, CodecError> {
    Parser::new(body, limits)?.method_name()
}

/// Parses a `<methodResponse>` body within `limits`.
pub fn parse_response(body: &[u8], limits: Limits) -> Result<MethodResponse, CodecError> {
    let mut parser = Parser::new(body, limits)?;
    parser.expect_open(Tag::MethodResponse, "<methodResponse>")?;
    let response = match parser.structural("<params> or <fault>")? {
        Token::Open(Tag::Params) => {
            let mut params = parser.params()?;
            if params.len() != 1 {
                return Err(parser.structure("exactly one <param> in a response"));
            }
            MethodResponse::Success(params.remove(0))
        }
        Token::Open(Tag::Fault) => {
            parser.expect_open(Tag::Value, "<value>")?;
            let value = parser.value_body()?;
            parser.expect_close("</fault>")?;
            let fault = fault_of(&value).ok_or_else(|| parser.structure("a fault struct"))?;
            MethodResponse::Fault(fault)
        }
        _ => return Err(parser.structure("<params> or <fault>")),
    };
    parser.expect_close("</methodResponse>")?;
    parser.expect_eof()?;
    Ok(response)
}

fn fault_of(value: &Value) -> Option<Fault> {
    let code = value.member("faultCode")?.as_i32()?;
    let message = value.member("faultString")?.as_str()?;
    Some(Fault {
        code,
        message: message.to_owned(),
    })
}

fn is_method_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/'))
}

/// The element names of XML-RPC; anything else is `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tag {
    MethodCall,
    MethodResponse,
    MethodName,
    Params,
    Param,
    Fault,
    Value,
    Int,
    I8,
    Boolean,
    String,
    Char,
    Double,
    DateTime,
    Base64,
    Struct,
    Member,
    Name,
    Array,
    Data,
    Nil,
    Unknown,
}

fn tag_of(name: &[u8]) -> Tag {
    match name {
        b"methodCall" => Tag::MethodCall,
        b"methodResponse" => Tag::MethodResponse,
        b"methodName" => Tag::MethodName,
        b"params" => Tag::Params,
        b"param" => Tag::Param,
        b"fault" => Tag::Fault,
        b"value" => Tag::Value,
        b"int" | b"i4" => Tag::Int,
        b"i8" => Tag::I8,
        b"boolean" => Tag::Boolean,
        b"string" => Tag::String,
        b"char" => Tag::Char,
        b"double" => Tag::Double,
        b"dateTime.iso8601" => Tag::DateTime,
        b"base64" => Tag::Base64,
        b"struct" => Tag::Struct,
        b"member" => Tag::Member,
        b"name" => Tag::Name,
        b"array" => Tag::Array,
        b"data" => Tag::Data,
        b"nil" => Tag::Nil,
        _ => Tag::Unknown,
    }
}

pub(crate) enum Token<'a> {
    Open(Tag),
    Close,
    Text(Cow<'a, str>),
    Eof,
}

/// The start of a `<value>`'s content.
pub(crate) enum ValueStart<'a> {
    /// Bare text, a string; `</value>` is consumed.
    Text(Cow<'a, str>),
    /// The opening tag of the typed element; its content and `</value>` follow.
    Typed(Tag),
}

pub(crate) const END_OF_BODY: &str = "end of body";

/// Struct size from which duplicate names are found by sorting, not scanning.
const STRUCT_SCAN_MEMBERS_MAX: usize = 16;

/// The pull parser under `parse_call`, also driven directly by decoders that
/// skip the `Value` tree (`upload`'s `send`).
pub(crate) struct Parser<'a> {
    body: &'a [u8],
    reader: Reader<&'a [u8]>,
    limits: Limits,
    depth: usize,
}

impl<'a> Parser<'a> {
    pub(crate) fn new(body: &'a [u8], limits: Limits) -> Result<Self, CodecError> {
        if body.len() > limits.body_bytes_max {
            return Err(CodecError::TooLarge {
                len: body.len(),
                max: limits.body_bytes_max,
            });
        }
        // The reader checks UTF-8 as it goes (reported as `NotUtf8`), so the
        // body is not scanned twice.
        let mut reader = Reader::from_reader(body);
        let config = reader.config_mut();
        // Whitespace inside <string> is data, so nothing is trimmed here; the
        // parser skips whitespace only where the grammar has no text.
        config.trim_text(false);
        // `<nil/>` and `<string/>` arrive as an open and a close, like any element.
        config.expand_empty_elements = true;
        config.check_end_names = true;
        config.allow_unmatched_ends = false;
        config.check_comments = true;
        config.allow_dangling_amp = false;
        Ok(Self {
            body,
            reader,
            limits,
            depth: 0,
        })
    }

    /// `<methodCall><methodName>NAME</methodName>`: the checked name.
    pub(crate) fn method_name(&mut self) -> Result<String, CodecError> {
        self.expect_open(Tag::MethodCall, "<methodCall>")?;
        self.expect_open(Tag::MethodName, "<methodName>")?;
        let name = self.text_until_close("method name")?;
        let name = name.trim();
        if !is_method_name(name) {
            return Err(self.structure("a method name of A-Z a-z 0-9 _ . : /"));
        }
        Ok(name.to_owned())
    }

    fn offset(&self) -> u64 {
        self.reader.buffer_position()
    }

    fn structure(&self, expected: &'static str) -> CodecError {
        CodecError::Structure {
            expected,
            offset: self.offset(),
        }
    }

    fn bad_scalar(&self, kind: &'static str) -> CodecError {
        CodecError::BadScalar {
            kind,
            offset: self.offset(),
        }
    }

    /// The next token, with comments, processing instructions and the XML
    /// declaration skipped and references resolved to text.
    fn token(&mut self) -> Result<Token<'a>, CodecError> {
        loop {
            let offset = self.offset();
            let body = self.body;
            let event = self.reader.read_event().map_err(|error| {
                let offset = self.reader.error_position();
                match error {
                    // The reader names where the event holding the bad
                    // bytes starts; the first bad byte is found from there.
                    quick_xml::Error::Encoding(_) => {
                        let from = usize::try_from(offset).unwrap_or(0).min(body.len());
                        let bad = std::str::from_utf8(&body[from..])
                            .err()
                            .map_or(0, |error| error.valid_up_to());
                        CodecError::NotUtf8 {
                            offset: offset + bad as u64,
                        }
                    }
                    _ => CodecError::Xml { offset },
                }
            })?;
            return Ok(match event {
                Event::Start(start) => Token::Open(tag_of(start.local_name().as_ref().as_bytes())),
                Event::End(_) => Token::Close,
                // Not produced with `expand_empty_elements`; treated as a closed element.
                Event::Empty(_) => return Err(CodecError::Xml { offset }),
                Event::Text(text) => Token::Text(text.xml10_content()),
                Event::CData(data) => Token::Text(data.into_inner()),
                Event::GeneralRef(reference) => Token::Text(
                    resolve_reference(&reference).ok_or(CodecError::UnknownEntity { offset })?,
                ),
                Event::DocType(_) => return Err(CodecError::Doctype { offset }),
                Event::Comment(_) | Event::PI(_) | Event::Decl(_) => continue,
                Event::Eof => Token::Eof,
            });
        }
    }

    /// The next token that is not whitespace; other text is an error.
    pub(crate) fn structural(&mut self, expected: &'static str) -> Result<Token<'a>, CodecError> {
        loop {
            match self.token()? {
                Token::Text(text) if is_xml_space(&text) => continue,
                Token::Text(_) => return Err(self.structure(expected)),
                Token::Eof if expected != END_OF_BODY => return Err(self.truncated()),
                token => return Ok(token),
            }
        }
    }

    pub(crate) fn expect_open(
        &mut self,
        tag: Tag,
        expected: &'static str,
    ) -> Result<(), CodecError> {
        match self.structural(expected)? {
            Token::Open(found) if found == tag => Ok(()),
            _ => Err(self.structure(expected)),
        }
    }

    pub(crate) fn expect_close(&mut self, expected: &'static str) -> Result<(), CodecError> {
        match self.structural(expected)? {
            Token::Close => Ok(()),
            _ => Err(self.structure(expected)),
        }
    }

    pub(crate) fn expect_eof(&mut self) -> Result<(), CodecError> {
        match self.structural(END_OF_BODY)? {
            Token::Eof => Ok(()),
            _ => Err(self.structure(END_OF_BODY)),
        }
    }

    /// The body ended inside an element: not well-formed.
    fn truncated(&self) -> CodecError {
        CodecError::Xml {
            offset: self.offset(),
        }
    }

    /// Text up to the close of the current element, which must hold no elements.
    pub(crate) fn text_until_close(
        &mut self,
        expected: &'static str,
    ) -> Result<Cow<'a, str>, CodecError> {
        let mut collected: Cow<'a, str> = Cow::Borrowed("");
        loop {
            match self.token()? {
                Token::Text(piece) if collected.is_empty() => collected = piece,
                Token::Text(piece) => collected.to_mut().push_str(&piece),
                Token::Close => return Ok(collected),
                Token::Open(_) => return Err(self.structure(expected)),
                Token::Eof => return Err(self.truncated()),
            }
        }
    }

    /// The `<param>` list after `<params>`, up to and including `</params>`.
    fn params(&mut self) -> Result<Vec<Value>, CodecError> {
        let mut params = Vec::new();
        loop {
            match self.structural("<param> or </params>")? {
                Token::Open(Tag::Param) => {
                    self.expect_open(Tag::Value, "<value>")?;
                    params.push(self.value_body()?);
                    self.expect_close("</param>")?;
                }
                Token::Close => return Ok(params),
                _ => return Err(self.structure("<param> or </params>")),
            }
        }
    }

    /// The content of a `<value>` up to and including `</value>`: one typed
    /// element, or bare text (a string).
    fn value_body(&mut self) -> Result<Value, CodecError> {
        match self.value_start()? {
            ValueStart::Text(text) => Ok(Value::String(text.into_owned())),
            ValueStart::Typed(tag) => {
                let value = self.typed(tag)?;
                self.expect_close("</value>")?;
                Ok(value)
            }
        }
    }

    /// The start of a `<value>`'s content: bare text up to `</value>`
    /// (consumed), or the opening tag of its typed element.
    pub(crate) fn value_start(&mut self) -> Result<ValueStart<'a>, CodecError> {
        let mut text: Cow<'a, str> = Cow::Borrowed("");
        loop {
            match self.token()? {
                Token::Text(piece) if text.is_empty() => text = piece,
                Token::Text(piece) => text.to_mut().push_str(&piece),
                Token::Close => return Ok(ValueStart::Text(text)),
                Token::Open(tag) => {
                    if !is_xml_space(&text) {
                        return Err(self.structure("either a type element or text in <value>"));
                    }
                    return Ok(ValueStart::Typed(tag));
                }
                Token::Eof => return Err(self.truncated()),
            }
        }
    }

    pub(crate) fn typed(&mut self, tag: Tag) -> Result<Value, CodecError> {
        match tag {
            Tag::String => Ok(Value::String(self.text_until_close("text")?.into_owned())),
            Tag::Char => {
                let text = self.text_until_close("one character")?;
                if text.chars().count() != 1 {
                    return Err(self.bad_scalar("char"));
                }
                Ok(Value::String(text.into_owned()))
            }
            Tag::Int => self.scalar("int", |text| text.parse().ok().map(Value::Int)),
            Tag::I8 => self.scalar("i8", |text| text.parse().ok().map(Value::I8)),
            Tag::Boolean => self.scalar("boolean", |text| match text {
                "1" => Some(Value::Bool(true)),
                "0" => Some(Value::Bool(false)),
                _ => None,
            }),
            Tag::Double => self.scalar("double", parse_double),
            Tag::DateTime => self.scalar("dateTime.iso8601", |text| {
                is_iso8601_basic(text).then(|| Value::DateTime(text.to_owned()))
            }),
            Tag::Base64 => {
                let text = self.text_until_close("base64 text")?;
                let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                base64::engine::general_purpose::STANDARD
                    .decode(compact.as_bytes())
                    .map(Value::Base64)
                    .map_err(|_| self.bad_scalar("base64"))
            }
            Tag::Nil => {
                self.expect_close("</nil>")?;
                Ok(Value::Nil)
            }
            Tag::Struct => self.nested(Self::struct_body),
            Tag::Array => self.nested(Self::array_body),
            _ => Err(self.structure("a value type element")),
        }
    }

    fn scalar(
        &mut self,
        kind: &'static str,
        convert: impl FnOnce(&str) -> Option<Value>,
    ) -> Result<Value, CodecError> {
        let text = self.text_until_close("text")?;
        convert(text.trim_matches(is_xml_space_char)).ok_or_else(|| self.bad_scalar(kind))
    }

    fn nested(
        &mut self,
        body: impl FnOnce(&mut Self) -> Result<Value, CodecError>,
    ) -> Result<Value, CodecError> {
        if self.depth >= self.limits.depth_max {
            return Err(CodecError::TooDeep {
                max: self.limits.depth_max,
            });
        }
        self.depth += 1;
        let value = body(self);
        self.depth -= 1;
        value
    }

    fn struct_body(&mut self) -> Result<Value, CodecError> {
        let mut members: Vec<Member> = Vec::new();
        loop {
            match self.structural("<member> or </struct>")? {
                Token::Open(Tag::Member) => {
                    self.expect_open(Tag::Name, "<name>")?;
                    let name = self.text_until_close("member name")?.into_owned();
                    self.expect_open(Tag::Value, "<value>")?;
                    let value = self.value_body()?;
                    self.expect_close("</member>")?;
                    let scan = members.len() < STRUCT_SCAN_MEMBERS_MAX;
                    if scan && members.iter().any(|member| member.name == name) {
                        return Err(CodecError::DuplicateMember {
                            offset: self.offset(),
                        });
                    }
                    members.push(Member { name, value });
                }
                Token::Close => break,
                _ => return Err(self.structure("<member> or </struct>")),
            }
        }
        if members.len() > STRUCT_SCAN_MEMBERS_MAX {
            let mut names: Vec<&str> = members.iter().map(|member| member.name.as_str()).collect();
            names.sort_unstable();
            if names.windows(2).any(|pair| pair[0] == pair[1]) {
                return Err(CodecError::DuplicateMember {
                    offset: self.offset(),
                });
            }
        }
        Ok(Value::Struct(members))
    }

    fn array_body(&mut self) -> Result<Value, CodecError> {
        let mut items = Vec::new();
        match self.structural("<data>")? {
            Token::Open(Tag::Data) => {}
            // `<array/>`: an empty array without `<data>`.
            Token::Close => return Ok(Value::Array(items)),
            _ => return Err(self.structure("<data>")),
        }
        loop {
            match self.structural("<value> or </data>")? {
                Token::Open(Tag::Value) => items.push(self.value_body()?),
                Token::Close => break,
                _ => return Err(self.structure("<value> or </data>")),
            }
        }
        self.expect_close("</array>")?;
        Ok(Value::Array(items))
    }
}

pub(crate) fn resolve_reference(
    reference: &quick_xml::events::BytesRef<'_>,
) -> Option<Cow<'static, str>> {
    if reference.is_char_ref() {
        let character = reference.resolve_char_ref().ok()??;
        return Some(Cow::Owned(character.to_string()));
    }
    let text = match &**reference {
        "lt" => "<",
        "gt" => ">",
        "amp" => "&",
        "apos" => "'",
        "quot" => "\"",
        _ => return None,
    };
    Some(Cow::Borrowed(text))
}

fn is_xml_space_char(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

fn is_xml_space(text: &str) -> bool {
    text.bytes()
        .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// Finite decimal numbers only: no `inf`, `nan` or hexadecimal forms.
fn parse_double(text: &str) -> Option<Value> {
    let plausible = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'));
    let number: f64 = if plausible {
        text.parse().ok()?
    } else {
        return None;
    };
    number.is_finite().then_some(Value::Double(number))
}

/// `YYYYMMDDTHH:MM:SS`, the only form XML-RPC defines.
fn is_iso8601_basic(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 17
        && bytes.iter().enumerate().all(|(index, &b)| match index {
            8 => b == b'T',
            11 | 14 => b == b':',
            _ => b.is_ascii_digit(),
        })
}

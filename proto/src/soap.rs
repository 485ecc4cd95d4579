//! SOAP 1.1 envelopes (for Parlay X Payment): parsed from bytes into a
//! small tree of namespaced elements, and answers and faults encoded. No
//! I/O.
//!
//! Bounded like the XML-RPC parser: the body's size is checked before
//! parsing, the nesting depth and the number of elements while parsing. No
//! DOCTYPE is accepted, so no DTD is read and no entity defined; only the
//! five predefined entities and character references are resolved. Errors
//! carry a byte offset and what was expected, never any text of the input.

use std::borrow::Cow;

use quick_xml::NsReader;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;

/// The SOAP 1.1 envelope namespace.
pub const ENVELOPE_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// The WS-Security extension namespace (its fault codes).
pub const WSSE_NS: &str =
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd";
/// The SOAP 1.2 envelope namespace: answered with a `VersionMismatch` fault.
pub const ENVELOPE_12_NS: &str = "http://www.w3.org/2003/05/soap-envelope";

/// Bounds on what the parser accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body accepted, in bytes. Larger input is refused before parsing.
    pub body_bytes_max: usize,
    /// Deepest nesting of elements accepted (the envelope is level 1).
    pub depth_max: usize,
    /// Most elements in one envelope.
    pub elements_max: usize,
}

impl Limits {
    /// For Parlay X calls: one small request each.
    pub const PAYMENT: Limits = Limits {
        body_bytes_max: 64 * 1024,
        depth_max: 24,
        elements_max: 2_048,
    };
}

/// Why a body is not an acceptable SOAP 1.1 envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SoapError {
    /// The body is larger than the limit; nothing of it was parsed.
    #[error("request of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size of the body in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// Elements are nested deeper than the limit.
    #[error("elements nested deeper than {max} levels")]
    TooDeep {
        /// The limit in levels.
        max: usize,
    },
    /// More elements than the limit.
    #[error("more than {max} elements")]
    TooManyElements {
        /// The limit.
        max: usize,
    },
    /// Not well-formed XML (or not UTF-8).
    #[error("body is not well-formed UTF-8 XML (at byte {offset})")]
    Xml {
        /// Byte offset where the parser stopped.
        offset: u64,
    },
    /// A document type declaration, which is never accepted.
    #[error("DOCTYPE is not allowed (at byte {offset})")]
    Doctype {
        /// Byte offset of the declaration.
        offset: u64,
    },
    /// An entity other than the five predefined ones, or a bad character
    /// reference.
    #[error("unknown entity or bad character reference (at byte {offset})")]
    UnknownEntity {
        /// Byte offset of the reference.
        offset: u64,
    },
    /// An envelope of another SOAP version (1.2).
    #[error("not a SOAP 1.1 envelope: this server speaks SOAP 1.1 only")]
    VersionMismatch,
    /// Well-formed XML that is not a SOAP envelope as expected.
    #[error("not a SOAP 1.1 envelope: expected {expected}")]
    Structure {
        /// What was expected.
        expected: &'static str,
    },
}

/// An attribute: its namespace (none for unprefixed names), local name and
/// value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    /// The namespace, for a prefixed name.
    pub namespace: Option<String>,
    /// The local name.
    pub name: String,
    /// The value, references resolved.
    pub value: String,
}

/// An element: its namespace and local name, attributes, the text directly
/// inside it, and the elements inside it, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// The namespace it is in (after prefixes and defaults are resolved).
    pub namespace: Option<String>,
    /// The local name.
    pub name: String,
    /// Its attributes, namespace declarations left out.
    pub attributes: Vec<Attribute>,
    /// The text directly inside it (pieces around children joined).
    pub text: String,
    /// The elements inside it.
    pub children: Vec<Element>,
}

impl Element {
    /// Whether it is `name` in namespace `namespace`.
    pub fn is(&self, namespace: &str, name: &str) -> bool {
        self.name == name && self.namespace.as_deref() == Some(namespace)
    }

    /// Its children named `name` (in any namespace or none: the common
    /// types of Parlay X have unqualified children, and clients differ).
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |child| child.name == name)
    }

    /// Its first child named `name` (in any namespace).
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|child| child.name == name)
    }

    /// The value of attribute `name` in `namespace` (`None`: unprefixed).
    pub fn attribute(&self, namespace: Option<&str>, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|attribute| attribute.name == name && attribute.namespace.as_deref() == namespace)
            .map(|attribute| attribute.value.as_str())
    }

    /// Whether a header entry asks to be understood
    /// (`soapenv:mustUnderstand="1"` or `"true"`).
    pub fn must_understand(&self) -> bool {
        matches!(
            self.attribute(Some(ENVELOPE_NS), "mustUnderstand")
                .map(str::trim),
            Some("1" | "true")
        )
    }
}

/// A parsed envelope: its header entries and its body's elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The children of `Header`, if any.
    pub headers: Vec<Element>,
    /// The children of `Body`.
    pub body: Vec<Element>,
}

/// Parses a SOAP 1.1 envelope within `limits`.
pub fn parse_envelope(body: &[u8], limits: Limits) -> Result<Envelope, SoapError> {
    let root = parse_document(body, limits)?;
    if root.name == "Envelope" && root.namespace.as_deref() == Some(ENVELOPE_12_NS) {
        return Err(SoapError::VersionMismatch);
    }
    if !root.is(ENVELOPE_NS, "Envelope") {
        return Err(SoapError::Structure {
            expected: "a SOAP 1.1 Envelope",
        });
    }
    let mut headers = None;
    let mut envelope_body = None;
    for child in root.children {
        let in_envelope = child.namespace.as_deref() == Some(ENVELOPE_NS);
        match child.name.as_str() {
            "Header" if in_envelope && headers.is_none() && envelope_body.is_none() => {
                headers = Some(child.children);
            }
            "Body" if in_envelope && envelope_body.is_none() => {
                envelope_body = Some(child.children)
            }
            _ if envelope_body.is_none() => {
                return Err(SoapError::Structure {
                    expected: "Header or Body",
                });
            }
            // A second Body (or a Header after the Body) is refused: a
            // reader that took the other Body would see another call.
            "Header" | "Body" if in_envelope => {
                return Err(SoapError::Structure {
                    expected: "one Body, after at most one Header",
                });
            }
            // SOAP 1.1 allows other elements after the Body; none means
            // anything here.
            _ => {}
        }
    }
    Ok(Envelope {
        headers: headers.unwrap_or_default(),
        body: envelope_body.ok_or(SoapError::Structure { expected: "a Body" })?,
    })
}

/// Parses a whole document into its root element within `limits`.
fn parse_document(body: &[u8], limits: Limits) -> Result<Element, SoapError> {
    if body.len() > limits.body_bytes_max {
        return Err(SoapError::TooLarge {
            len: body.len(),
            max: limits.body_bytes_max,
        });
    }
    let mut reader = NsReader::from_reader(body);
    let config = reader.config_mut();
    config.trim_text(false);
    config.expand_empty_elements = true;
    config.check_end_names = true;
    config.allow_unmatched_ends = false;
    config.check_comments = true;
    config.allow_dangling_amp = false;
    let mut stack: Vec<Element> = Vec::new();
    let mut root = None;
    let mut elements = 0usize;
    loop {
        let offset = reader.buffer_position();
        let (namespace, event) = match reader.read_resolved_event() {
            Ok((resolved, event)) => (namespace_of(&resolved, offset)?, event),
            Err(_) => {
                return Err(SoapError::Xml {
                    offset: reader.error_position(),
                });
            }
        };
        match event {
            Event::Start(start) => {
                if root.is_some() {
                    return Err(SoapError::Structure {
                        expected: "one root element",
                    });
                }
                elements += 1;
                if elements > limits.elements_max {
                    return Err(SoapError::TooManyElements {
                        max: limits.elements_max,
                    });
                }
                if stack.len() >= limits.depth_max {
                    return Err(SoapError::TooDeep {
                        max: limits.depth_max,
                    });
                }
                let element = element_of(&reader, &start, namespace, offset)?;
                stack.push(element);
            }
            Event::End(_) => {
                let done = stack.pop().ok_or(SoapError::Xml { offset })?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(done),
                    None => root = Some(done),
                }
            }
            Event::Empty(_) => return Err(SoapError::Xml { offset }),
            Event::Text(text) => {
                push_text(&mut stack, &text.xml10_content(), offset)?;
            }
            Event::CData(data) => {
                push_text(&mut stack, &data.into_inner(), offset)?;
            }
            Event::GeneralRef(reference) => {
                let text = crate::xmlrpc::resolve_reference(&reference)
                    .ok_or(SoapError::UnknownEntity { offset })?;
                push_text(&mut stack, &text, offset)?;
            }
            Event::DocType(_) => return Err(SoapError::Doctype { offset }),
            Event::Comment(_) | Event::PI(_) | Event::Decl(_) => {}
            Event::Eof => {
                if !stack.is_empty() {
                    return Err(SoapError::Xml { offset });
                }
                return root.ok_or(SoapError::Structure {
                    expected: "a root element",
                });
            }
        }
    }
}

/// Text goes to the open element; outside the root only whitespace may be.
/// Characters XML 1.0 forbids (NUL, most controls), raw or as a character
/// reference, make the body not well-formed.
fn push_text(stack: &mut [Element], text: &str, offset: u64) -> Result<(), SoapError> {
    if !text.chars().all(xml_char) {
        return Err(SoapError::Xml { offset });
    }
    match stack.last_mut() {
        Some(open) => {
            open.text.push_str(text);
            Ok(())
        }
        None if text
            .bytes()
            .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n')) =>
        {
            Ok(())
        }
        None => Err(SoapError::Xml { offset }),
    }
}

fn namespace_of(resolved: &ResolveResult<'_>, offset: u64) -> Result<Option<String>, SoapError> {
    match resolved {
        ResolveResult::Bound(namespace) => Ok(Some(namespace.as_ref().to_owned())),
        ResolveResult::Unbound => Ok(None),
        // A prefix no declaration binds: not namespace-well-formed.
        ResolveResult::Unknown(_) => Err(SoapError::Xml { offset }),
    }
}

fn element_of(
    reader: &NsReader<&[u8]>,
    start: &BytesStart<'_>,
    namespace: Option<String>,
    offset: u64,
) -> Result<Element, SoapError> {
    let bad = || SoapError::Xml { offset };
    let name = start.local_name().as_ref().to_owned();
    let mut attributes = Vec::new();
    for attribute in start.attributes() {
        let attribute = attribute.map_err(|_| bad())?;
        let key = attribute.key;
        if key.as_ref() == "xmlns" || key.as_ref().starts_with("xmlns:") {
            continue;
        }
        let (resolved, local) = reader.resolver().resolve_attribute(key);
        let namespace = namespace_of(&resolved, offset)?;
        let value: Cow<'_, str> = attribute
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|error| match error {
                quick_xml::Error::Escape(_) => SoapError::UnknownEntity { offset },
                _ => bad(),
            })?;
        attributes.push(Attribute {
            namespace,
            name: local.as_ref().to_owned(),
            value: value.into_owned(),
        });
    }
    Ok(Element {
        namespace,
        name,
        attributes,
        text: String::new(),
        children: Vec::new(),
    })
}

/// `text` escaped for element content and attribute values.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.contains(|c: char| matches!(c, '<' | '>' | '&' | '"' | '\'') || !xml_char(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Not allowed in XML 1.0 at all, not even as a reference.
            c if !xml_char(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Whether XML 1.0 allows `c` in a document (its `Char` production).
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// An envelope whose body holds `body_xml` (already encoded).
pub fn envelope(body_xml: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
         <soapenv:Envelope xmlns:soapenv=\"{ENVELOPE_NS}\"><soapenv:Body>{body_xml}\
         </soapenv:Body></soapenv:Envelope>"
    )
}

/// Who a SOAP 1.1 fault blames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultCode {
    /// The envelope is of another SOAP version.
    VersionMismatch,
    /// A header asked to be understood that this server does not process.
    MustUnderstand,
    /// The request is wrong (not well formed, refused by policy, ...).
    Client,
    /// The server failed; the request may be retried.
    Server,
    /// WS-Security: the security token could not be authenticated.
    FailedAuthentication,
}

impl FaultCode {
    /// The qualified name in a `faultcode`.
    pub fn qualified(self) -> &'static str {
        match self {
            FaultCode::VersionMismatch => "soapenv:VersionMismatch",
            FaultCode::MustUnderstand => "soapenv:MustUnderstand",
            FaultCode::Client => "soapenv:Client",
            FaultCode::Server => "soapenv:Server",
            FaultCode::FailedAuthentication => "wsse:FailedAuthentication",
        }
    }
}

/// A fault envelope: `code`, the human `message`, and `detail_xml`
/// (already encoded) inside `<detail>` when given.
pub fn fault(code: FaultCode, message: &str, detail_xml: Option<&str>) -> String {
    let detail = detail_xml.map_or(String::new(), |detail| format!("<detail>{detail}</detail>"));
    // A qualified code's prefix is declared where it is used.
    let declared = match code {
        FaultCode::FailedAuthentication => format!(" xmlns:wsse=\"{WSSE_NS}\""),
        _ => String::new(),
    };
    envelope(&format!(
        "<soapenv:Fault{declared}><faultcode>{}</faultcode><faultstring>{}</faultstring>\
         {detail}</soapenv:Fault>",
        code.qualified(),
        escape(message)
    ))
}

impl SoapError {
    /// The fault that answers it.
    pub fn fault_code(&self) -> FaultCode {
        match self {
            SoapError::VersionMismatch => FaultCode::VersionMismatch,
            _ => FaultCode::Client,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits::PAYMENT;

    fn charge(header: &str) -> String {
        format!(
            "<?xml version=\"1.0\"?>\n<soapenv:Envelope xmlns:soapenv=\"{ENVELOPE_NS}\" \
             xmlns:loc=\"urn:local\"><soapenv:Header>{header}</soapenv:Header>\
             <soapenv:Body><loc:chargeAmount><loc:endUserIdentifier>mailto:a@b.example\
             </loc:endUserIdentifier><loc:charge><description>tone &amp; &#233;cho</description>\
             <amount>1.50</amount></loc:charge><loc:referenceCode><![CDATA[r<1>]]>\
             </loc:referenceCode></loc:chargeAmount></soapenv:Body></soapenv:Envelope>"
        )
    }

    #[test]
    fn an_envelope_is_read_into_namespaced_elements_with_text_resolved() {
        let envelope = parse_envelope(
            charge("<v:Vendor xmlns:v=\"urn:v\" a=\"1\"><v:spId>7</v:spId></v:Vendor>").as_bytes(),
            LIMITS,
        )
        .unwrap();
        assert_eq!(envelope.headers.len(), 1);
        assert!(envelope.headers[0].is("urn:v", "Vendor"));
        assert!(!envelope.headers[0].must_understand());
        assert_eq!(envelope.headers[0].attribute(None, "a"), Some("1"));
        assert_eq!(envelope.body.len(), 1);
        let call = &envelope.body[0];
        assert!(call.is("urn:local", "chargeAmount"));
        let charge = call.child("charge").unwrap();
        assert_eq!(
            charge.child("description").unwrap().text,
            "tone & \u{e9}cho"
        );
        assert_eq!(charge.child("description").unwrap().namespace, None);
        assert_eq!(call.child("referenceCode").unwrap().text, "r<1>");
    }

    #[test]
    fn characters_xml_forbids_are_refused_raw_or_referenced() {
        for text in [
            "a\u{1}b",
            "nul \0",
            "&#1;",
            "&#x0;",
            "<![CDATA[\u{1b}]]>",
            "\u{FFFE}",
        ] {
            let body = charge("")
                .replace("Tone", text)
                .replace("tone &amp; &#233;cho", text);
            assert!(
                matches!(
                    parse_envelope(body.as_bytes(), LIMITS),
                    Err(SoapError::Xml { .. } | SoapError::UnknownEntity { .. })
                ),
                "{text:?}"
            );
        }
        let fine = charge("").replace("tone &amp; &#233;cho", "tab\there &#x10348; &#9;");
        assert!(parse_envelope(fine.as_bytes(), LIMITS).is_ok());
    }

    #[test]
    fn fault_text_with_characters_xml_forbids_still_makes_a_document() {
        let text = "currency \u{1}\u{1b}[31m <x> & \u{FFFF} \t\u{10348}";
        let fault = fault(FaultCode::Client, text, None);
        let read = parse_envelope(fault.as_bytes(), LIMITS).expect("a well-formed fault");
        assert_eq!(
            read.body[0].child("faultstring").unwrap().text,
            "currency \u{FFFD}\u{FFFD}[31m <x> & \u{FFFD} \t\u{10348}"
        );
        assert!(matches!(escape("plain text"), Cow::Borrowed(_)));
    }

    #[test]
    fn must_understand_is_read_from_the_envelope_namespace_only() {
        let with = |attribute: &str| {
            let text = charge(&format!("<x:H xmlns:x=\"urn:x\" {attribute}/>"));
            parse_envelope(text.as_bytes(), LIMITS).unwrap().headers[0].must_understand()
        };
        assert!(with("soapenv:mustUnderstand=\"1\""));
        assert!(with("soapenv:mustUnderstand=\"true\""));
        assert!(!with("soapenv:mustUnderstand=\"0\""));
        assert!(!with("mustUnderstand=\"1\""));
        assert!(!with("x:mustUnderstand=\"1\""));
    }

    #[test]
    fn hostile_and_wrong_bodies_are_refused_with_the_right_error() {
        let refused = |body: &str| parse_envelope(body.as_bytes(), LIMITS).unwrap_err();
        let doctype = format!(
            "<!DOCTYPE e [<!ENTITY x \"y\">]><soapenv:Envelope xmlns:soapenv=\"{ENVELOPE_NS}\"/>"
        );
        assert!(matches!(refused(&doctype), SoapError::Doctype { .. }));
        let entity = charge("").replace("&amp;", "&x;");
        assert!(matches!(refused(&entity), SoapError::UnknownEntity { .. }));
        let v12 = "<e:Envelope xmlns:e=\"http://www.w3.org/2003/05/soap-envelope\"><e:Body/></e:Envelope>";
        assert_eq!(refused(v12), SoapError::VersionMismatch);
        assert_eq!(refused(v12).fault_code(), FaultCode::VersionMismatch);
        assert!(matches!(
            refused("<Envelope/>"),
            SoapError::Structure { .. }
        ));
        let no_body = format!("<s:Envelope xmlns:s=\"{ENVELOPE_NS}\"><s:Header/></s:Envelope>");
        assert!(matches!(refused(&no_body), SoapError::Structure { .. }));
        // Two Bodies, or a Header after the Body: refused, whichever a
        // reader would take. Another element after the Body is allowed.
        for (first, second) in [("<s:Body/>", "<s:Body/>"), ("<s:Body/>", "<s:Header/>")] {
            let twice =
                format!("<s:Envelope xmlns:s=\"{ENVELOPE_NS}\">{first}{second}</s:Envelope>");
            assert!(
                matches!(refused(&twice), SoapError::Structure { .. }),
                "{twice}"
            );
        }
        let trailer = format!(
            "<s:Envelope xmlns:s=\"{ENVELOPE_NS}\"><s:Body/><x:Trailer xmlns:x=\"urn:x\"/></s:Envelope>"
        );
        assert!(parse_envelope(trailer.as_bytes(), LIMITS).is_ok());
        assert!(matches!(refused(&charge("")[..200]), SoapError::Xml { .. }));
        assert!(matches!(refused("<a:b>x</a:b>"), SoapError::Xml { .. }));
        let deep = format!(
            "<s:Envelope xmlns:s=\"{ENVELOPE_NS}\"><s:Body>{}{}</s:Body></s:Envelope>",
            "<a>".repeat(40),
            "</a>".repeat(40)
        );
        assert_eq!(refused(&deep), SoapError::TooDeep { max: 24 });
        let many = format!(
            "<s:Envelope xmlns:s=\"{ENVELOPE_NS}\"><s:Body>{}</s:Body></s:Envelope>",
            "<a/>".repeat(3_000)
        );
        assert_eq!(refused(&many), SoapError::TooManyElements { max: 2_048 });
        let large = " ".repeat(LIMITS.body_bytes_max + 1);
        assert!(matches!(refused(&large), SoapError::TooLarge { .. }));
        assert!(matches!(refused("\u{feff}"), SoapError::Structure { .. }));
        let invalid = b"<s:Envelope xmlns:s=\"x\">\xff</s:Envelope>";
        assert!(parse_envelope(invalid, LIMITS).is_err());
    }

    #[test]
    fn faults_and_answers_are_escaped_envelopes_that_parse_back() {
        let text = fault(
            FaultCode::Client,
            "bad <input> & more",
            Some(
                "<ns:ServiceException xmlns:ns=\"urn:c\"><messageId>SVC0002</messageId></ns:ServiceException>",
            ),
        );
        let parsed = parse_envelope(text.as_bytes(), LIMITS).unwrap();
        let fault = &parsed.body[0];
        assert!(fault.is(ENVELOPE_NS, "Fault"));
        assert_eq!(fault.child("faultcode").unwrap().text, "soapenv:Client");
        assert_eq!(
            fault.child("faultstring").unwrap().text,
            "bad <input> & more"
        );
        let detail = fault.child("detail").unwrap();
        assert_eq!(
            detail
                .child("ServiceException")
                .unwrap()
                .child("messageId")
                .unwrap()
                .text,
            "SVC0002"
        );
        let answer = envelope("<r:x xmlns:r=\"urn:r\"/>");
        assert!(parse_envelope(answer.as_bytes(), LIMITS).unwrap().body[0].is("urn:r", "x"));
        assert_eq!(escape("plain"), Cow::Borrowed("plain"));
        assert_eq!(escape("'\""), "&apos;&quot;");
    }
}

//! Parlay X Payment v2.1 (3GPP TS 29.199-6, with the `confirmationRefs` of
//! OMA's proposal): the requests of its four interfaces decoded from the
//! body element of a SOAP envelope (`soap`), the answers and faults
//! encoded. No I/O; the backoffice decides what a request may do.
//!
//! Element names and order are the standard's: messages in the
//! interface's `local` namespace, the children of `ChargingInformation`
//! and `Property` unqualified (the common schemas have no
//! `elementFormDefault`). Decoding is lenient about the namespace of
//! children (clients differ) and strict about the operation's.

use crate::amount::Amount;
use crate::soap::{Element, escape};

/// Namespace of the common types (`ChargingInformation`, the exceptions).
pub const COMMON_NS: &str = "http://www.csapi.org/schema/parlayx/common/v2_1";
/// Namespace of the payment data types (`Property`).
pub const PAYMENT_TYPES_NS: &str = "http://www.csapi.org/schema/parlayx/payment/v2_1";

/// Most `confirmationRefs` in one request (more is POL0252).
pub const CONFIRMATION_REFS_MAX: usize = 16;
/// Most rating parameters (`Property`) in one request.
pub const PARAMETERS_MAX: usize = 16;
/// Most parts of a split charge.
pub const SPLITS_MAX: usize = 16;
/// Longest text of any one part, in bytes.
pub const TEXT_BYTES_MAX: usize = 1_024;

/// The four interfaces, each at a path of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interface {
    /// `chargeAmount`, `refundAmount`, `chargeSplitAmount`.
    AmountCharging,
    /// `chargeVolume`, `getAmount`, `refundVolume`.
    VolumeCharging,
    /// `reserveAmount`, `reserveAdditionalAmount`, `chargeReservation`,
    /// `releaseReservation`.
    ReserveAmountCharging,
    /// `getAmount`, `reserveVolume`, `reserveAdditionalVolume`,
    /// `chargeReservation`, `releaseReservation`.
    ReserveVolumeCharging,
}

impl Interface {
    /// Every interface.
    pub const ALL: [Interface; 4] = [
        Interface::AmountCharging,
        Interface::VolumeCharging,
        Interface::ReserveAmountCharging,
        Interface::ReserveVolumeCharging,
    ];

    /// The standard's name (port type).
    pub fn name(self) -> &'static str {
        match self {
            Interface::AmountCharging => "AmountCharging",
            Interface::VolumeCharging => "VolumeCharging",
            Interface::ReserveAmountCharging => "ReserveAmountCharging",
            Interface::ReserveVolumeCharging => "ReserveVolumeCharging",
        }
    }

    /// The part of the namespaces that names it (`amount_charging`).
    pub fn slug(self) -> &'static str {
        match self {
            Interface::AmountCharging => "amount_charging",
            Interface::VolumeCharging => "volume_charging",
            Interface::ReserveAmountCharging => "reserve_amount_charging",
            Interface::ReserveVolumeCharging => "reserve_volume_charging",
        }
    }

    /// The namespace of its messages.
    pub fn local_ns(self) -> String {
        format!(
            "http://www.csapi.org/schema/parlayx/payment/{}/v2_1/local",
            self.slug()
        )
    }

    /// The path it is served at, as gateways of the standard do.
    pub fn path(self) -> String {
        format!("/{0}Service/services/{0}", self.name())
    }

    /// The interface served at `path`, if one is.
    pub fn at_path(path: &str) -> Option<Interface> {
        Interface::ALL
            .into_iter()
            .find(|interface| interface.path() == path)
    }
}

/// `ChargingInformation`: what a charge is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargingInformation {
    /// What appears on the bill.
    pub description: String,
    /// ISO 4217 code, if given.
    pub currency: Option<String>,
    /// The amount, if given.
    pub amount: Option<Amount>,
    /// A code naming the price instead (here: a PID whose TACA prices it).
    pub code: Option<String>,
}

/// `Property`: a rating parameter (`unit`, `contract`, `service`,
/// `operation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// One payer's part of a split charge (`SplitType`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Who pays it.
    pub end_user: String,
    /// Percent of the charge, a decimal above 0 and at most 100.
    pub percent: Amount,
}

/// A charge by volume: what it is rated with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// How much (units as `parameters` say).
    pub volume: i64,
    /// The rating parameters.
    pub parameters: Vec<Property>,
}

/// A Parlay X Payment request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `chargeAmount`.
    ChargeAmount {
        /// Who pays.
        end_user: String,
        /// What.
        charge: ChargingInformation,
        /// The service's reference code.
        reference: String,
        /// Evidence of the service provided.
        confirmation_refs: Vec<String>,
    },
    /// `refundAmount`.
    RefundAmount {
        /// Who is refunded.
        end_user: String,
        /// What.
        charge: ChargingInformation,
        /// The service's reference code.
        reference: String,
        /// Evidence of the service provided.
        confirmation_refs: Vec<String>,
    },
    /// `chargeSplitAmount` (Parlay X 3; served beside v2.1's calls).
    ChargeSplitAmount {
        /// Who pays which part.
        splits: Vec<Split>,
        /// What.
        charge: ChargingInformation,
        /// The service's reference code.
        reference: String,
        /// Evidence of the service provided.
        confirmation_refs: Vec<String>,
    },
    /// `chargeVolume`.
    ChargeVolume {
        /// Who pays.
        end_user: String,
        /// How much of what.
        volume: Volume,
        /// What appears on the bill.
        billing_text: String,
        /// The service's reference code.
        reference: String,
    },
    /// `getAmount` (of either volume interface).
    GetAmount {
        /// Who would pay.
        end_user: String,
        /// How much of what.
        volume: Volume,
    },
    /// `refundVolume`.
    RefundVolume {
        /// Who is refunded.
        end_user: String,
        /// How much of what.
        volume: Volume,
        /// What appears on the bill.
        billing_text: String,
        /// The service's reference code.
        reference: String,
    },
    /// `reserveAmount`.
    ReserveAmount {
        /// Whose money.
        end_user: String,
        /// How much.
        charge: ChargingInformation,
    },
    /// `reserveAdditionalAmount`: more (or less) reserved.
    ReserveAdditionalAmount {
        /// The reservation.
        reservation: String,
        /// How much more (negative: less).
        charge: ChargingInformation,
    },
    /// `chargeReservation` of `ReserveAmountCharging`.
    ChargeReservation {
        /// The reservation.
        reservation: String,
        /// How much of it.
        charge: ChargingInformation,
        /// The service's reference code.
        reference: String,
    },
    /// `releaseReservation` (of either reservation interface).
    ReleaseReservation {
        /// The reservation.
        reservation: String,
    },
    /// `reserveVolume`.
    ReserveVolume {
        /// Whose money.
        end_user: String,
        /// How much of what.
        volume: Volume,
        /// What appears on the bill.
        billing_text: String,
    },
    /// `reserveAdditionalVolume`.
    ReserveAdditionalVolume {
        /// The reservation.
        reservation: String,
        /// How much more (negative: less), rated as the reservation was.
        volume: i64,
        /// What appears on the bill.
        billing_text: String,
    },
    /// `chargeReservation` of `ReserveVolumeCharging`.
    ChargeReservationVolume {
        /// The reservation.
        reservation: String,
        /// How much of it, rated as the reservation was.
        volume: i64,
        /// What appears on the bill, if given.
        billing_text: Option<String>,
        /// The service's reference code.
        reference: String,
    },
}

/// Why a request does not decode: the SOAP fault it gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not an operation of this interface (a SOAP Client fault).
    #[error("{0} is not an operation of this interface")]
    UnknownOperation(String),
    /// A part is missing (SVC0002, naming it).
    #[error("the part {0} is missing")]
    Missing(&'static str),
    /// A part is not valid (SVC0002, naming it).
    #[error("the part {0} is not valid")]
    Invalid(&'static str),
    /// Too many `confirmationRefs` (POL0252).
    #[error("too many confirmationRefs")]
    TooManyConfirmationRefs,
}

fn text_of(element: &Element, part: &'static str) -> Result<String, DecodeError> {
    let text = element.text.trim();
    if text.len() > TEXT_BYTES_MAX {
        return Err(DecodeError::Invalid(part));
    }
    Ok(text.to_owned())
}

fn required(parent: &Element, part: &'static str) -> Result<String, DecodeError> {
    let element = parent.child(part).ok_or(DecodeError::Missing(part))?;
    text_of(element, part)
}

fn optional(parent: &Element, part: &'static str) -> Result<Option<String>, DecodeError> {
    parent
        .child(part)
        .map(|element| text_of(element, part))
        .transpose()
}

fn long(parent: &Element, part: &'static str) -> Result<i64, DecodeError> {
    required(parent, part)?
        .parse()
        .map_err(|_| DecodeError::Invalid(part))
}

fn decimal(text: &str, part: &'static str) -> Result<Amount, DecodeError> {
    // xsd:decimal also allows a leading '+' and a bare leading or trailing
    // point; the ledger's form is the rest.
    let text = text.strip_prefix('+').unwrap_or(text);
    let mut owned = String::with_capacity(text.len() + 2);
    if text.starts_with('.') || text.starts_with("-.") {
        owned.push_str(&text.replacen('.', "0.", 1));
    } else {
        owned.push_str(text);
    }
    if owned.ends_with('.') {
        owned.pop();
    }
    Amount::parse(&owned).map_err(|_| DecodeError::Invalid(part))
}

fn charging(parent: &Element) -> Result<ChargingInformation, DecodeError> {
    let charge = parent
        .child("charge")
        .ok_or(DecodeError::Missing("charge"))?;
    let empty_to_none = |text: Option<String>| text.filter(|text| !text.is_empty());
    Ok(ChargingInformation {
        description: optional(charge, "description")?.unwrap_or_default(),
        currency: empty_to_none(optional(charge, "currency")?),
        amount: empty_to_none(optional(charge, "amount")?)
            .map(|text| decimal(&text, "charge.amount"))
            .transpose()?,
        code: empty_to_none(optional(charge, "code")?),
    })
}

fn parameters(parent: &Element) -> Result<Vec<Property>, DecodeError> {
    let mut properties = Vec::new();
    for property in parent.children_named("parameters") {
        if properties.len() == PARAMETERS_MAX {
            return Err(DecodeError::Invalid("parameters"));
        }
        properties.push(Property {
            name: required(property, "name")?,
            value: required(property, "value")?,
        });
    }
    Ok(properties)
}

fn confirmation_refs(parent: &Element) -> Result<Vec<String>, DecodeError> {
    let mut refs = Vec::new();
    for reference in parent.children_named("confirmationRefs") {
        if refs.len() == CONFIRMATION_REFS_MAX {
            return Err(DecodeError::TooManyConfirmationRefs);
        }
        refs.push(text_of(reference, "confirmationRefs")?);
    }
    Ok(refs)
}

fn splits(parent: &Element) -> Result<Vec<Split>, DecodeError> {
    let mut splits = Vec::new();
    for split in parent.children_named("splitInfo") {
        if splits.len() == SPLITS_MAX {
            return Err(DecodeError::Invalid("splitInfo"));
        }
        splits.push(Split {
            end_user: required(split, "endUserIdentifier")?,
            percent: decimal(&required(split, "percent")?, "splitInfo.percent")?,
        });
    }
    if splits.is_empty() {
        return Err(DecodeError::Missing("splitInfo"));
    }
    Ok(splits)
}

fn volume(parent: &Element) -> Result<Volume, DecodeError> {
    Ok(Volume {
        volume: long(parent, "volume")?,
        parameters: parameters(parent)?,
    })
}

impl Request {
    /// Decodes the body element of a call to `interface`.
    pub fn decode(interface: Interface, element: &Element) -> Result<Request, DecodeError> {
        let unknown = || DecodeError::UnknownOperation(element.name.clone());
        if element.namespace.as_deref() != Some(interface.local_ns().as_str()) {
            return Err(unknown());
        }
        let end_user = || required(element, "endUserIdentifier");
        let reference = || required(element, "referenceCode");
        let reservation = || required(element, "reservationIdentifier");
        let billing_text = || required(element, "billingText");
        use Interface::*;
        Ok(match (interface, element.name.as_str()) {
            (AmountCharging, "chargeAmount") => Request::ChargeAmount {
                end_user: end_user()?,
                charge: charging(element)?,
                reference: reference()?,
                confirmation_refs: confirmation_refs(element)?,
            },
            (AmountCharging, "refundAmount") => Request::RefundAmount {
                end_user: end_user()?,
                charge: charging(element)?,
                reference: reference()?,
                confirmation_refs: confirmation_refs(element)?,
            },
            (AmountCharging, "chargeSplitAmount") => Request::ChargeSplitAmount {
                splits: splits(element)?,
                charge: charging(element)?,
                reference: reference()?,
                confirmation_refs: confirmation_refs(element)?,
            },
            (VolumeCharging, "chargeVolume") => Request::ChargeVolume {
                end_user: end_user()?,
                volume: volume(element)?,
                billing_text: billing_text()?,
                reference: reference()?,
            },
            (VolumeCharging | ReserveVolumeCharging, "getAmount") => Request::GetAmount {
                end_user: end_user()?,
                volume: volume(element)?,
            },
            (VolumeCharging, "refundVolume") => Request::RefundVolume {
                end_user: end_user()?,
                volume: volume(element)?,
                billing_text: billing_text()?,
                reference: reference()?,
            },
            (ReserveAmountCharging, "reserveAmount") => Request::ReserveAmount {
                end_user: end_user()?,
                charge: charging(element)?,
            },
            (ReserveAmountCharging, "reserveAdditionalAmount") => {
                Request::ReserveAdditionalAmount {
                    reservation: reservation()?,
                    charge: charging(element)?,
                }
            }
            (ReserveAmountCharging, "chargeReservation") => Request::ChargeReservation {
                reservation: reservation()?,
                charge: charging(element)?,
                reference: reference()?,
            },
            (ReserveAmountCharging | ReserveVolumeCharging, "releaseReservation") => {
                Request::ReleaseReservation {
                    reservation: reservation()?,
                }
            }
            (ReserveVolumeCharging, "reserveVolume") => Request::ReserveVolume {
                end_user: end_user()?,
                volume: volume(element)?,
                billing_text: billing_text()?,
            },
            (ReserveVolumeCharging, "reserveAdditionalVolume") => {
                Request::ReserveAdditionalVolume {
                    reservation: reservation()?,
                    volume: long(element, "volume")?,
                    billing_text: billing_text()?,
                }
            }
            (ReserveVolumeCharging, "chargeReservation") => Request::ChargeReservationVolume {
                reservation: reservation()?,
                volume: long(element, "volume")?,
                billing_text: optional(element, "billingText")?,
                reference: reference()?,
            },
            _ => return Err(unknown()),
        })
    }

    /// The operation's name, as in the WSDL.
    pub fn operation(&self) -> &'static str {
        match self {
            Request::ChargeAmount { .. } => "chargeAmount",
            Request::RefundAmount { .. } => "refundAmount",
            Request::ChargeSplitAmount { .. } => "chargeSplitAmount",
            Request::ChargeVolume { .. } => "chargeVolume",
            Request::GetAmount { .. } => "getAmount",
            Request::RefundVolume { .. } => "refundVolume",
            Request::ReserveAmount { .. } => "reserveAmount",
            Request::ReserveAdditionalAmount { .. } => "reserveAdditionalAmount",
            Request::ChargeReservation { .. } | Request::ChargeReservationVolume { .. } => {
                "chargeReservation"
            }
            Request::ReleaseReservation { .. } => "releaseReservation",
            Request::ReserveVolume { .. } => "reserveVolume",
            Request::ReserveAdditionalVolume { .. } => "reserveAdditionalVolume",
        }
    }

    /// The service's reference code, for the operations that have one.
    pub fn reference(&self) -> Option<&str> {
        match self {
            Request::ChargeAmount { reference, .. }
            | Request::RefundAmount { reference, .. }
            | Request::ChargeSplitAmount { reference, .. }
            | Request::ChargeVolume { reference, .. }
            | Request::RefundVolume { reference, .. }
            | Request::ChargeReservation { reference, .. }
            | Request::ChargeReservationVolume { reference, .. } => Some(reference),
            _ => None,
        }
    }

    /// The request in a canonical form (every part, in order, each
    /// length-prefixed, each list preceded by its count): two requests are
    /// the same request when their forms are equal, whatever their XML
    /// spelling, and two different requests never have one form. Kept
    /// stable: digests of it are stored with each request, marked with
    /// `CANONICAL_FORM`; a change to it is a new form number.
    pub fn canonical(&self) -> String {
        self.form(true)
    }

    /// The canonical form as it was before lists were counted (form 1),
    /// which requests stored then were digested from. Two different
    /// requests can share it (a split list and a reference list that line
    /// up), so it is only ever compared with records written then.
    pub fn canonical_uncounted(&self) -> String {
        self.form(false)
    }

    fn form(&self, counted: bool) -> String {
        let count = |parts: &mut Vec<String>, n: usize| {
            if counted {
                parts.push(n.to_string());
            }
        };
        let mut parts: Vec<String> = vec![self.operation().to_owned()];
        let charge = |parts: &mut Vec<String>, charge: &ChargingInformation| {
            parts.push(charge.description.clone());
            parts.push(charge.currency.clone().unwrap_or_default());
            parts.push(
                charge
                    .amount
                    .map(|amount| amount.to_string())
                    .unwrap_or_default(),
            );
            parts.push(charge.code.clone().unwrap_or_default());
        };
        let volume = |parts: &mut Vec<String>, volume: &Volume| {
            parts.push(volume.volume.to_string());
            count(parts, volume.parameters.len());
            for property in &volume.parameters {
                parts.push(property.name.clone());
                parts.push(property.value.clone());
            }
        };
        match self {
            Request::ChargeAmount {
                end_user,
                charge: c,
                reference,
                confirmation_refs,
            }
            | Request::RefundAmount {
                end_user,
                charge: c,
                reference,
                confirmation_refs,
            } => {
                parts.push(end_user.clone());
                charge(&mut parts, c);
                parts.push(reference.clone());
                count(&mut parts, confirmation_refs.len());
                parts.extend(confirmation_refs.iter().cloned());
            }
            Request::ChargeSplitAmount {
                splits,
                charge: c,
                reference,
                confirmation_refs,
            } => {
                count(&mut parts, splits.len());
                for split in splits {
                    parts.push(split.end_user.clone());
                    parts.push(split.percent.to_string());
                }
                charge(&mut parts, c);
                parts.push(reference.clone());
                count(&mut parts, confirmation_refs.len());
                parts.extend(confirmation_refs.iter().cloned());
            }
            Request::ChargeVolume {
                end_user,
                volume: v,
                billing_text,
                reference,
            }
            | Request::RefundVolume {
                end_user,
                volume: v,
                billing_text,
                reference,
            } => {
                parts.push(end_user.clone());
                volume(&mut parts, v);
                parts.push(billing_text.clone());
                parts.push(reference.clone());
            }
            Request::GetAmount {
                end_user,
                volume: v,
            } => {
                parts.push(end_user.clone());
                volume(&mut parts, v);
            }
            Request::ReserveAmount {
                end_user,
                charge: c,
            } => {
                parts.push(end_user.clone());
                charge(&mut parts, c);
            }
            Request::ReserveAdditionalAmount {
                reservation,
                charge: c,
            } => {
                parts.push(reservation.clone());
                charge(&mut parts, c);
            }
            Request::ChargeReservation {
                reservation,
                charge: c,
                reference,
            } => {
                parts.push(reservation.clone());
                charge(&mut parts, c);
                parts.push(reference.clone());
            }
            Request::ReleaseReservation { reservation } => parts.push(reservation.clone()),
            Request::ReserveVolume {
                end_user,
                volume: v,
                billing_text,
            } => {
                parts.push(end_user.clone());
                volume(&mut parts, v);
                parts.push(billing_text.clone());
            }
            Request::ReserveAdditionalVolume {
                reservation,
                volume: v,
                billing_text,
            } => {
                parts.push(reservation.clone());
                parts.push(v.to_string());
                parts.push(billing_text.clone());
            }
            Request::ChargeReservationVolume {
                reservation,
                volume: v,
                billing_text,
                reference,
            } => {
                parts.push(reservation.clone());
                parts.push(v.to_string());
                parts.push(billing_text.clone().unwrap_or_default());
                parts.push(reference.clone());
            }
        }
        let mut out = String::new();
        for part in parts {
            out.push_str(&part.len().to_string());
            out.push(':');
            out.push_str(&part);
            out.push(';');
        }
        out
    }
}

/// The number of the canonical form `Request::canonical` gives: 2 counts
/// each list; 1 (`Request::canonical_uncounted`) did not.
pub const CANONICAL_FORM: u8 = 2;

/// The answer element of `operation` with `result` text inside, if any.
pub fn response(interface: Interface, operation: &str, result: Option<&str>) -> String {
    let ns = interface.local_ns();
    match result {
        None => format!("<ns1:{operation}Response xmlns:ns1=\"{ns}\"/>"),
        Some(result) => format!(
            "<ns1:{operation}Response xmlns:ns1=\"{ns}\"><ns1:result>{}</ns1:result>\
             </ns1:{operation}Response>",
            escape(result)
        ),
    }
}

/// The answer of `getAmount`: a `ChargingInformation` as `result`.
pub fn amount_response(interface: Interface, charge: &ChargingInformation) -> String {
    let ns = interface.local_ns();
    let mut inner = format!("<description>{}</description>", escape(&charge.description));
    if let Some(currency) = &charge.currency {
        inner.push_str(&format!("<currency>{}</currency>", escape(currency)));
    }
    if let Some(amount) = &charge.amount {
        inner.push_str(&format!("<amount>{amount}</amount>"));
    }
    if let Some(code) = &charge.code {
        inner.push_str(&format!("<code>{}</code>", escape(code)));
    }
    format!(
        "<ns1:getAmountResponse xmlns:ns1=\"{ns}\"><ns1:result>{inner}</ns1:result>\
         </ns1:getAmountResponse>"
    )
}

/// The kind of a Parlay X exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExceptionKind {
    /// `ServiceException` (SVCnnnn).
    Service,
    /// `PolicyException` (POLnnnn).
    Policy,
}

/// A Parlay X exception: its id, text with `%1`... and the variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exception {
    /// Service or policy.
    pub kind: ExceptionKind,
    /// `SVC0001`, `POL0253`, ...
    pub message_id: &'static str,
    /// The text, with `%1`, `%2` where the variables go.
    pub text: &'static str,
    /// The variables.
    pub variables: Vec<String>,
}

impl Exception {
    /// `SVC0001`: a service error (`%1` says which).
    pub fn service_error(why: impl Into<String>) -> Exception {
        Exception::service("SVC0001", "A service error occurred. Error code is %1", why)
    }

    /// `SVC0002`: an invalid input value in part `part`.
    pub fn invalid_input(part: impl Into<String>) -> Exception {
        Exception::service("SVC0002", "Invalid input value for message part %1", part)
    }

    /// `SVC0007`: invalid charging information.
    pub fn invalid_charging(why: impl Into<String>) -> Exception {
        Exception::service("SVC0007", "Invalid charging information: %1", why)
    }

    /// `SVC0270`: the charge failed and was not applied.
    pub fn charge_failed(why: impl Into<String>) -> Exception {
        Exception::service(
            "SVC0270",
            "Charging operation failed, the charge was not applied: %1",
            why,
        )
    }

    /// `POL0001`: a policy error (`%1` says which).
    pub fn policy_error(why: impl Into<String>) -> Exception {
        Exception::policy("POL0001", "A policy error occurred. Error code is %1", why)
    }

    /// `POL0252`: too many confirmation references in part `part`.
    pub fn too_many_confirmation_refs(part: impl Into<String>) -> Exception {
        Exception::policy(
            "POL0252",
            "Too many confirmation references specified in message part %1",
            part,
        )
    }

    /// `POL0253`: invalid confirmation references (`refs`).
    pub fn invalid_confirmation_refs(refs: impl Into<String>) -> Exception {
        Exception::policy("POL0253", "Invalid confirmation references %1", refs)
    }

    fn service(id: &'static str, text: &'static str, variable: impl Into<String>) -> Exception {
        Exception {
            kind: ExceptionKind::Service,
            message_id: id,
            text,
            variables: vec![variable.into()],
        }
    }

    fn policy(id: &'static str, text: &'static str, variable: impl Into<String>) -> Exception {
        Exception {
            kind: ExceptionKind::Policy,
            ..Exception::service(id, text, variable)
        }
    }

    /// The text with its variables put in.
    pub fn message(&self) -> String {
        let mut text = self.text.to_owned();
        for (index, variable) in self.variables.iter().enumerate().rev() {
            text = text.replace(&format!("%{}", index + 1), variable);
        }
        text
    }

    /// The fault envelope: `soapenv:Client` with the exception in
    /// `detail`, as the common faults WSDL declares it.
    pub fn fault(&self) -> String {
        let element = match self.kind {
            ExceptionKind::Service => "ServiceException",
            ExceptionKind::Policy => "PolicyException",
        };
        let mut detail = format!(
            "<ns2:{element} xmlns:ns2=\"{COMMON_NS}\"><messageId>{}</messageId><text>{}</text>",
            self.message_id,
            escape(self.text)
        );
        for variable in &self.variables {
            detail.push_str(&format!("<variables>{}</variables>", escape(variable)));
        }
        detail.push_str(&format!("</ns2:{element}>"));
        crate::soap::fault(
            crate::soap::FaultCode::Client,
            &self.message(),
            Some(&detail),
        )
    }

    /// The exception a decoding error gets.
    pub fn of_decode(error: &DecodeError) -> Exception {
        match error {
            DecodeError::Missing(part) | DecodeError::Invalid(part) => {
                Exception::invalid_input(*part)
            }
            DecodeError::TooManyConfirmationRefs => {
                Exception::too_many_confirmation_refs("confirmationRefs")
            }
            DecodeError::UnknownOperation(name) => Exception::invalid_input(name.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soap::{Limits, parse_envelope};

    fn body(interface: Interface, inner: &str) -> Element {
        let text = format!(
            "<s:Envelope xmlns:s=\"{}\" xmlns:loc=\"{}\"><s:Body>{inner}</s:Body></s:Envelope>",
            crate::soap::ENVELOPE_NS,
            interface.local_ns()
        );
        parse_envelope(text.as_bytes(), Limits::PAYMENT)
            .unwrap()
            .body
            .remove(0)
    }

    #[test]
    fn a_charge_decodes_with_its_charging_information_and_evidence() {
        let element = body(
            Interface::AmountCharging,
            "<loc:chargeAmount><loc:endUserIdentifier> mailto:ada@example.org </loc:endUserIdentifier>\
             <loc:charge><description>Ring tone</description><currency>EUR</currency>\
             <amount>+1.50</amount><code/></loc:charge><loc:referenceCode>r-1</loc:referenceCode>\
             <loc:confirmationRefs>B1-M3:b1:4</loc:confirmationRefs></loc:chargeAmount>",
        );
        let request = Request::decode(Interface::AmountCharging, &element).unwrap();
        assert_eq!(
            request,
            Request::ChargeAmount {
                end_user: "mailto:ada@example.org".into(),
                charge: ChargingInformation {
                    description: "Ring tone".into(),
                    currency: Some("EUR".into()),
                    amount: Some(Amount::parse("1.5").unwrap()),
                    code: None,
                },
                reference: "r-1".into(),
                confirmation_refs: vec!["B1-M3:b1:4".into()],
            }
        );
        assert_eq!(request.operation(), "chargeAmount");
        assert_eq!(request.reference(), Some("r-1"));
        // The same request spelled otherwise has the same canonical form.
        let again = body(
            Interface::AmountCharging,
            "<x:chargeAmount xmlns:x=\"http://www.csapi.org/schema/parlayx/payment/amount_charging/v2_1/local\">\
             <x:endUserIdentifier>mailto:ada@example.org</x:endUserIdentifier><x:charge>\
             <description>Ring tone</description><currency>EUR</currency><amount>1.500</amount>\
             </x:charge><x:referenceCode>r-1</x:referenceCode><x:confirmationRefs>B1-M3:b1:4\
             </x:confirmationRefs></x:chargeAmount>",
        );
        let again = Request::decode(Interface::AmountCharging, &again).unwrap();
        assert_eq!(again.canonical(), request.canonical());
        let Request::ChargeAmount { charge, .. } = &again else {
            unreachable!()
        };
        assert_eq!(charge.amount, Some(Amount::parse("1.5").unwrap()));
    }

    #[test]
    fn lists_of_different_lengths_never_make_one_canonical_form() {
        let charge = |description: &str, currency: Option<&str>| ChargingInformation {
            description: description.into(),
            currency: currency.map(str::to_owned),
            amount: Some(Amount::parse("1").unwrap()),
            code: None,
        };
        let split = |end_user: &str, percent: &str| Split {
            end_user: end_user.into(),
            percent: Amount::parse(percent).unwrap(),
        };
        // Two splits and no references against one split and two
        // references: without counts, both are the parts
        // a, 50, D, 50, 1, "", 1, "", R.
        let two_splits = Request::ChargeSplitAmount {
            splits: vec![split("a", "50"), split("D", "50")],
            charge: charge("1", None),
            reference: "R".into(),
            confirmation_refs: vec![],
        };
        let one_split = Request::ChargeSplitAmount {
            splits: vec![split("a", "50")],
            charge: charge("D", Some("50")),
            reference: "1".into(),
            confirmation_refs: vec![String::new(), "R".into()],
        };
        assert_ne!(two_splits.canonical(), one_split.canonical());
        // Form 1, kept for requests stored before form 2, is the one that
        // could not tell them apart.
        assert_eq!(
            two_splits.canonical_uncounted(),
            one_split.canonical_uncounted()
        );
    }

    #[test]
    fn both_canonical_forms_stay_as_digests_were_stored() {
        let request = Request::ChargeAmount {
            end_user: "tel:+15550100".into(),
            charge: ChargingInformation {
                description: "song".into(),
                currency: Some("EUR".into()),
                amount: Some(Amount::parse("1.5").unwrap()),
                code: None,
            },
            reference: "r-1".into(),
            confirmation_refs: vec!["b:1".into()],
        };
        assert_eq!(
            request.canonical(),
            "12:chargeAmount;13:tel:+15550100;4:song;3:EUR;3:1.5;0:;3:r-1;1:1;3:b:1;"
        );
        assert_eq!(
            request.canonical_uncounted(),
            "12:chargeAmount;13:tel:+15550100;4:song;3:EUR;3:1.5;0:;3:r-1;3:b:1;"
        );
        assert_eq!(CANONICAL_FORM, 2);
    }

    #[test]
    fn missing_invalid_and_foreign_parts_are_named() {
        let decode = |interface, inner: &str| Request::decode(interface, &body(interface, inner));
        assert_eq!(
            decode(
                Interface::AmountCharging,
                "<loc:chargeAmount><loc:charge/></loc:chargeAmount>"
            ),
            Err(DecodeError::Missing("endUserIdentifier"))
        );
        assert_eq!(
            decode(
                Interface::AmountCharging,
                "<loc:chargeAmount><loc:endUserIdentifier>tel:1</loc:endUserIdentifier>\
                 <loc:charge><amount>1e3</amount></loc:charge><loc:referenceCode>r</loc:referenceCode>\
                 </loc:chargeAmount>"
            ),
            Err(DecodeError::Invalid("charge.amount"))
        );
        // An operation of another interface, or in another namespace.
        assert!(matches!(
            decode(Interface::AmountCharging, "<loc:reserveAmount/>"),
            Err(DecodeError::UnknownOperation(_))
        ));
        let foreign = body(Interface::VolumeCharging, "<loc:chargeAmount/>");
        assert!(matches!(
            Request::decode(Interface::AmountCharging, &foreign),
            Err(DecodeError::UnknownOperation(_))
        ));
        let refs =
            "<loc:confirmationRefs>x</loc:confirmationRefs>".repeat(CONFIRMATION_REFS_MAX + 1);
        assert_eq!(
            decode(
                Interface::AmountCharging,
                &format!(
                    "<loc:chargeAmount><loc:endUserIdentifier>tel:1</loc:endUserIdentifier>\
                     <loc:charge><amount>1</amount></loc:charge>\
                     <loc:referenceCode>r</loc:referenceCode>{refs}</loc:chargeAmount>"
                )
            ),
            Err(DecodeError::TooManyConfirmationRefs)
        );
        assert_eq!(
            decode(
                Interface::ReserveVolumeCharging,
                "<loc:chargeReservation><loc:reservationIdentifier>R1</loc:reservationIdentifier>\
                 <loc:volume>ten</loc:volume><loc:referenceCode>r</loc:referenceCode>\
                 </loc:chargeReservation>"
            ),
            Err(DecodeError::Invalid("volume"))
        );
    }

    #[test]
    fn every_interface_decodes_its_own_operations() {
        let ok = |interface, inner: &str| {
            Request::decode(interface, &body(interface, inner))
                .unwrap()
                .operation()
        };
        let volume = "<loc:volume>3</loc:volume><loc:parameters><name>unit</name>\
                      <value>MB</value></loc:parameters>";
        let user = "<loc:endUserIdentifier>tel:+1</loc:endUserIdentifier>";
        assert_eq!(
            ok(
                Interface::VolumeCharging,
                &format!("<loc:getAmount>{user}{volume}</loc:getAmount>")
            ),
            "getAmount"
        );
        assert_eq!(
            ok(
                Interface::ReserveVolumeCharging,
                &format!(
                    "<loc:reserveVolume>{user}{volume}<loc:billingText>t</loc:billingText>\
                     </loc:reserveVolume>"
                )
            ),
            "reserveVolume"
        );
        assert_eq!(
            ok(
                Interface::ReserveAmountCharging,
                "<loc:releaseReservation><loc:reservationIdentifier>R</loc:reservationIdentifier>\
                 </loc:releaseReservation>"
            ),
            "releaseReservation"
        );
        let split = ok(
            Interface::AmountCharging,
            "<loc:chargeSplitAmount><loc:splitInfo><endUserIdentifier>tel:1</endUserIdentifier>\
             <percent>60</percent></loc:splitInfo><loc:splitInfo><endUserIdentifier>tel:2\
             </endUserIdentifier><percent>40</percent></loc:splitInfo><loc:charge><amount>1\
             </amount></loc:charge><loc:referenceCode>r</loc:referenceCode></loc:chargeSplitAmount>",
        );
        assert_eq!(split, "chargeSplitAmount");
        assert_eq!(
            Interface::at_path("/AmountChargingService/services/AmountCharging"),
            Some(Interface::AmountCharging)
        );
        assert_eq!(Interface::at_path("/AmountCharging"), None);
    }

    #[test]
    fn exceptions_are_faults_with_id_text_and_variables() {
        let fault = Exception::invalid_input("referenceCode").fault();
        let parsed = parse_envelope(fault.as_bytes(), Limits::PAYMENT).unwrap();
        let fault = &parsed.body[0];
        assert_eq!(
            fault.child("faultstring").unwrap().text,
            "Invalid input value for message part referenceCode"
        );
        let exception = fault
            .child("detail")
            .unwrap()
            .child("ServiceException")
            .unwrap();
        assert!(exception.is(COMMON_NS, "ServiceException"));
        assert_eq!(exception.child("messageId").unwrap().text, "SVC0002");
        assert_eq!(exception.child("variables").unwrap().text, "referenceCode");
        let policy = Exception::invalid_confirmation_refs("B1-M1:x:1").fault();
        assert!(policy.contains("PolicyException") && policy.contains("POL0253"));
    }
}

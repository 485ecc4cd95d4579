//! Mail that leaves the machine. Every message (reset links, notices) is
//! first written to the outbox folder, durably, one file per message
//! (`send_mail` in the pages' module); that is all the pages do, so a page
//! answers as fast whether or not it sent mail, and a crash or an SMTP
//! relay that is down loses nothing. Without an SMTP relay configured the
//! outbox is where mail stays (the default, and what the tests read). With
//! one, a delivery thread sends each file through the relay (`lettre`,
//! TLS by rustls) and deletes it once the relay took it; a relay that
//! refuses or cannot be reached is tried again later, with backoff.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{Message, SmtpTransport, Transport};

/// How the connection to the relay is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Security {
    /// TLS from the first byte (SMTPS, port 465 by default).
    Tls,
    /// Plain first, then STARTTLS, required (port 587 by default); a relay
    /// that does not offer it gets no credentials and no mail.
    Starttls,
    /// No encryption (port 25 by default): only to a relay on this machine
    /// (a loopback address or `localhost`).
    Plain,
}

/// Where and how mail is sent (no `Debug`: it holds the relay's password).
#[derive(Clone)]
pub struct SmtpSettings {
    /// The relay's host name (checked against its certificate) or address.
    pub host: String,
    /// Its port; by default the one of `security`.
    pub port: Option<u16>,
    /// TLS, STARTTLS or plain.
    pub security: Security,
    /// The user name and password, when the relay wants them.
    pub credentials: Option<(String, String)>,
    /// The sender of every message: `Branch <noreply@example.org>`.
    pub from: String,
}

/// The relay, ready to send through.
pub struct Smtp {
    transport: SmtpTransport,
    from: Mailbox,
    host: String,
}

/// How long one SMTP command may take before the try is given up.
pub const SMTP_TIMEOUT: Duration = Duration::from_secs(30);
/// The delivery thread looks at the outbox this often.
pub const DELIVERY_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait between tries while the relay fails.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// Messages that cannot be sent at all (an address the relay or `lettre`
/// refuses, or one the relay kept refusing for [`GIVE_UP_AFTER`]) are
/// moved to this folder of the outbox, for the operator.
pub const UNDELIVERABLE: &str = "undeliverable";
/// A message the relay refused for a while this long is set aside.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(3 * 24 * 3600);

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

impl Smtp {
    /// Checks the settings and builds the transport (no connection yet).
    pub fn new(settings: &SmtpSettings) -> Result<Smtp, String> {
        let from: Mailbox = settings.from.parse().map_err(|error| {
            format!(
                "the sender {:?} is not a mail address: {error}",
                settings.from
            )
        })?;
        let host = settings.host.trim();
        if host.is_empty() {
            return Err("the SMTP host is empty".to_owned());
        }
        let tls = || {
            TlsParameters::new(host.trim_matches(['[', ']']).to_owned())
                .map_err(|error| format!("TLS for {host}: {error}"))
        };
        let (security, port) = match settings.security {
            Security::Tls => (Tls::Wrapper(tls()?), 465),
            Security::Starttls => (Tls::Required(tls()?), 587),
            Security::Plain if is_loopback(host) => (Tls::None, 25),
            Security::Plain => {
                return Err(format!(
                    "plain SMTP only to a relay on this machine, not {host}: use tls or starttls"
                ));
            }
        };
        let mut builder = SmtpTransport::builder_dangerous(host.trim_matches(['[', ']']))
            .port(settings.port.unwrap_or(port))
            .tls(security)
            .timeout(Some(SMTP_TIMEOUT));
        if let Some((user, password)) = &settings.credentials {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(Smtp {
            transport: builder.build(),
            from,
            host: host.to_owned(),
        })
    }

    /// Sends every message of `outbox` through the relay, oldest first,
    /// deleting each once the relay has taken it. A relay that cannot be
    /// reached or refuses the branch (a wrong password, a refused sender:
    /// `test_connection` fails) ends the pass before any message is
    /// touched, to be tried again later. A message the relay refuses for
    /// now is passed over (the others still go); one it refuses for good,
    /// or for [`GIVE_UP_AFTER`], is moved to [`UNDELIVERABLE`]. Returns how
    /// many were sent and how many were passed over.
    pub fn deliver(&self, outbox: &Path) -> Result<(usize, usize), String> {
        let mut waiting = spooled(outbox).map_err(|error| error.to_string())?;
        if waiting.is_empty() {
            return Ok((0, 0));
        }
        waiting.sort();
        match self.transport.test_connection() {
            Ok(true) => {}
            Ok(false) => return Err(format!("the relay {} does not answer", self.host)),
            Err(error) => return Err(format!("the relay {}: {error}", self.host)),
        }
        let mut sent = 0;
        let mut passed_over = 0;
        for path in waiting {
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                // Taken by another delivery meanwhile.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(format!("{}: {error}", path.display())),
            };
            let message = parse(&text).and_then(|(to, subject, body)| {
                // The address alone, as the registry checked it: never a
                // display name hiding another address.
                let mailbox: Mailbox = to
                    .parse()
                    .map_err(|error| format!("the address {to:?}: {error}"))?;
                if mailbox.name.is_some() || mailbox.email.to_string() != to {
                    return Err(format!("the address {to:?} is not a plain address"));
                }
                let to = mailbox;
                Message::builder()
                    .from(self.from.clone())
                    .to(to)
                    .subject(subject)
                    .header(lettre::message::header::ContentType::TEXT_PLAIN)
                    .body(body.to_owned())
                    .map_err(|error| error.to_string())
            });
            let message = match message {
                Ok(message) => message,
                Err(why) => {
                    set_aside(outbox, &path, &why);
                    continue;
                }
            };
            match self.transport.send(&message) {
                Ok(_) => {
                    std::fs::remove_file(&path)
                        .map_err(|error| format!("{}: {error}", path.display()))?;
                    sent += 1;
                }
                // 5xx for this message (the connection and login passed):
                // the relay will never take it.
                Err(error) if error.is_permanent() => {
                    set_aside(outbox, &path, &error.to_string());
                }
                Err(error) => {
                    let age = std::fs::metadata(&path)
                        .and_then(|meta| meta.modified())
                        .ok()
                        .and_then(|written| written.elapsed().ok())
                        .unwrap_or_default();
                    if age > GIVE_UP_AFTER {
                        set_aside(outbox, &path, &format!("refused for days: {error}"));
                    } else {
                        tracing::warn!(message = %path.display(), %error, "the relay refused a message for now");
                        passed_over += 1;
                    }
                }
            }
        }
        Ok((sent, passed_over))
    }
}

/// The outbox's messages waiting (files being written start with `.`).
fn spooled(outbox: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(outbox) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') && name.ends_with(".eml") && entry.file_type()?.is_file() {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// Moves a message that cannot be sent out of the way, and says why.
fn set_aside(outbox: &Path, path: &Path, why: &str) {
    tracing::error!(message = %path.display(), %why, "mail cannot be sent: set aside in {UNDELIVERABLE}/");
    let folder = outbox.join(UNDELIVERABLE);
    let moved = durable::private_dir(&folder)
        .and_then(|()| std::fs::rename(path, folder.join(path.file_name().unwrap_or_default())));
    if let Err(error) = moved {
        tracing::error!(%error, "cannot move the message aside");
    }
}

/// Reads a message as the outbox keeps it: `To:`, `Subject:`, other
/// headers, a blank line, the body.
fn parse(text: &str) -> Result<(&str, &str, &str), String> {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("a message without a blank line after its headers")?;
    let header = |name: &str| {
        head.split("\r\n")
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .ok_or(format!("a message without {name}"))
    };
    Ok((header("To:")?, header("Subject:")?, body))
}

/// Delivers the outbox through `smtp` every [`DELIVERY_INTERVAL`], on a
/// thread of its own, until the process ends; a failing relay is tried
/// again after a wait that doubles up to [`RETRY_MAX`].
pub fn spawn_delivery(outbox: PathBuf, smtp: Smtp) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("mail-delivery".into())
        .spawn(move || {
            let mut wait = DELIVERY_INTERVAL;
            loop {
                match smtp.deliver(&outbox) {
                    Ok((sent, passed_over)) => {
                        if sent > 0 {
                            tracing::info!(sent, relay = %smtp.host, "mail sent");
                        }
                        // Messages refused for now wait like a failing relay.
                        wait = if passed_over > 0 {
                            (wait * 2).min(RETRY_MAX)
                        } else {
                            DELIVERY_INTERVAL
                        };
                    }
                    Err(error) => {
                        tracing::warn!(%error, retry_in_s = wait.as_secs(), "mail not sent yet");
                        wait = (wait * 2).min(RETRY_MAX);
                    }
                }
                std::thread::sleep(wait);
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(host: &str, security: Security) -> SmtpSettings {
        SmtpSettings {
            host: host.to_owned(),
            port: None,
            security,
            credentials: None,
            from: "Branch <noreply@example.org>".to_owned(),
        }
    }

    #[test]
    fn plain_smtp_goes_only_to_this_machine() {
        for host in ["127.0.0.1", "localhost", "::1", "[::1]"] {
            assert!(
                Smtp::new(&settings(host, Security::Plain)).is_ok(),
                "{host}"
            );
        }
        for host in ["mail.example.org", "10.0.0.1", "127.0.0.1.example.org"] {
            let refused = Smtp::new(&settings(host, Security::Plain)).err().unwrap();
            assert!(refused.contains("plain SMTP only"), "{host}: {refused}");
            assert!(
                Smtp::new(&settings(host, Security::Starttls)).is_ok(),
                "{host}"
            );
        }
        let mut bad = settings("mail.example.org", Security::Tls);
        bad.from = "not an address".to_owned();
        assert!(
            Smtp::new(&bad)
                .err()
                .unwrap()
                .contains("not a mail address")
        );
        assert!(Smtp::new(&settings(" ", Security::Tls)).is_err());
    }

    #[test]
    fn outbox_messages_are_read_back() {
        let text = "To: ada@example.org\r\nSubject: Your password\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello\r\n\r\nBye";
        assert_eq!(
            parse(text).unwrap(),
            ("ada@example.org", "Your password", "Hello\r\n\r\nBye")
        );
        assert!(parse("To: a@b\r\nno blank line").is_err());
        assert!(parse("Subject: x\r\n\r\nbody").is_err());
    }
}

//! What librdkafka says about its connections, for every client the program creates:
//! its log lines go to `tracing` with secrets masked, and a connection it cannot make
//! for a reason retrying cannot fix (rejected credentials, an untrusted or missing
//! certificate) is kept, so that the caller stops with an error that names the setting
//! to fix instead of waiting for a broker forever.
//!
//! Invariant kept here: a fault is final only while no broker connection has ever
//! succeeded (a configuration error); once connected, the same failures are outages
//! that librdkafka retries by itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tracing::{debug, info, warn};

use crate::config::mask_secrets;

/// How long the operator's commands and the sample publisher wait for a first
/// connection to the cluster.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why no connection to the cluster could be made, and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionFault {
    /// The cluster rejected the SASL credentials or mechanism.
    #[error(
        "Kafka rejected the client's credentials: {0}. Check kafka.librdkafka \"sasl.mechanisms\" (one the cluster \
         enables), \"sasl.username\" and \"sasl.password\" (for OAUTHBEARER: the \"sasl.oauthbearer.*\" settings)"
    )]
    Authentication(String),
    /// The broker's certificate is not trusted.
    #[error(
        "the broker's TLS certificate is not trusted: {0}. Set kafka.librdkafka \"ssl.ca.location\" to the PEM file \
         of the CA that signed it (or install that CA in the system's trust store)"
    )]
    UntrustedBroker(String),
    /// The broker wants a client certificate, or refused the one given.
    #[error(
        "the broker refused the TLS connection, it requires a client certificate it trusts: {0}. Set \
         kafka.librdkafka \"ssl.certificate.location\" and \"ssl.key.location\" (and \"ssl.key.password\" for an \
         encrypted key) to a certificate signed by a CA the broker trusts"
    )]
    ClientCertificate(String),
    /// Any other TLS failure.
    #[error(
        "the TLS connection to the broker failed: {0}. Check kafka.brokers (a TLS listener) and the kafka.librdkafka \
         \"security.protocol\" and \"ssl.*\" settings"
    )]
    Tls(String),
}

impl ConnectionFault {
    /// The fault a librdkafka error or connection-failure line describes, if it is one
    /// that retrying cannot fix.
    pub fn classify(code: Option<RDKafkaErrorCode>, text: &str) -> Option<ConnectionFault> {
        let text = mask_secrets(text.trim());
        let lower = text.to_ascii_lowercase();
        let mentions_tls = lower.contains("ssl") || lower.contains("certificate") || lower.contains("tls");
        if code == Some(RDKafkaErrorCode::Authentication)
            || lower.contains("sasl authentication error")
            || lower.contains("authentication failed")
        {
            return Some(ConnectionFault::Authentication(text));
        }
        if lower.contains("certificate verify failed") || lower.contains("failed to verify broker certificate") {
            return Some(ConnectionFault::UntrustedBroker(text));
        }
        if lower.contains("alert bad certificate")
            || lower.contains("alert certificate required")
            || lower.contains("alert unknown ca")
            || lower.contains("client ssl authentication might be required")
        {
            return Some(ConnectionFault::ClientCertificate(text));
        }
        if code == Some(RDKafkaErrorCode::SSL) || (lower.contains("handshake") && mentions_tls) {
            return Some(ConnectionFault::Tls(text));
        }
        None
    }
}

/// One client's (or one worker's clients') connection state.
#[derive(Debug, Default)]
pub struct ConnectionWatch {
    connected: AtomicBool,
    fault: Mutex<Option<ConnectionFault>>,
}

impl ConnectionWatch {
    /// A broker connection succeeded: later faults are outages, not configuration errors.
    pub fn connected(&self) {
        if !self.connected.swap(true, Ordering::Relaxed) {
            debug!("connected to a Kafka broker");
        }
    }

    /// Whether a broker connection ever succeeded.
    pub fn has_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Notes what librdkafka reported; keeps the first fault that retrying cannot fix.
    pub fn note(&self, code: Option<RDKafkaErrorCode>, text: &str) {
        if let Some(fault) = ConnectionFault::classify(code, text) {
            let mut kept = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
            if kept.is_none() {
                *kept = Some(fault);
            }
        }
    }

    /// The fault to stop for: one seen before any connection succeeded.
    pub fn fatal(&self) -> Option<ConnectionFault> {
        if self.has_connected() {
            return None;
        }
        self.fault.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// `error`, explained by the fault behind it when there is one.
    pub fn explain(&self, error: KafkaError) -> ClientError {
        match self.fatal() {
            Some(fault) => ClientError::Connection(fault),
            None => ClientError::Kafka(error),
        }
    }

    /// librdkafka's log line, to `tracing` (secrets masked). Its "error" lines are
    /// connection failures it retries by itself (also reported to the readiness
    /// probe), not something an operator must act on: they are warnings here, unless
    /// they are faults retrying cannot fix.
    pub fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let message = mask_secrets(message);
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(target: "librdkafka", facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
                self.note(None, &message);
                warn!(target: "librdkafka", facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", facility, "librdkafka: {message}"),
        }
    }
}

/// A Kafka call's failure: librdkafka's error, or the connection fault behind it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// librdkafka's error.
    #[error("{}", mask_secrets(&.0.to_string()))]
    Kafka(#[from] KafkaError),
    /// No connection could be made; the message names the setting to fix.
    #[error("{0}")]
    Connection(ConnectionFault),
}

/// The callbacks of the program's clients other than the worker's consumer.
#[derive(Clone, Default)]
pub struct Watched {
    /// What the client's connections did.
    pub watch: Arc<ConnectionWatch>,
}

impl ClientContext for Watched {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.watch.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.watch.note(error.rdkafka_error_code(), reason);
        warn!(error = %mask_secrets(&error.to_string()), reason = %mask_secrets(reason), "Kafka client error");
    }
}

impl ConsumerContext for Watched {}

/// Waits until `fetch` (a metadata request, say) succeeds, giving up early on a fault
/// retrying cannot fix and after `timeout` otherwise; blocking.
///
/// # Errors
/// The fault, or the last error of `fetch`.
pub fn until_connected<T>(
    watch: &ConnectionWatch,
    timeout: std::time::Duration,
    mut fetch: impl FnMut(std::time::Duration) -> Result<T, KafkaError>,
) -> Result<T, ClientError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match fetch(left.min(std::time::Duration::from_millis(500))) {
            // librdkafka may answer from what it knows without a broker: a fault seen
            // meanwhile still wins.
            Ok(value) => {
                if let Some(fault) = watch.fatal() {
                    return Err(ClientError::Connection(fault));
                }
                watch.connected();
                return Ok(value);
            }
            Err(error) => {
                if let Some(fault) = watch.fatal() {
                    return Err(ClientError::Connection(fault));
                }
                if left.is_zero() {
                    return Err(ClientError::Kafka(error));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_retrying_cannot_fix_are_told_apart() {
        let auth = "sasl_ssl://127.0.0.1:39095/bootstrap: SASL authentication error: Authentication failed during \
                    authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512";
        assert!(matches!(ConnectionFault::classify(None, auth), Some(ConnectionFault::Authentication(_))));
        let untrusted = "ssl://127.0.0.1:39094/bootstrap: SSL handshake failed: error:0A000086:SSL routines::\
                         certificate verify failed: broker certificate could not be verified";
        assert!(matches!(ConnectionFault::classify(None, untrusted), Some(ConnectionFault::UntrustedBroker(_))));
        let no_client_cert = "ssl://127.0.0.1:39096/bootstrap: Receive failed: error:0A000412:SSL routines::sslv3 \
                              alert bad certificate: SSL alert number 42";
        assert!(matches!(ConnectionFault::classify(None, no_client_cert), Some(ConnectionFault::ClientCertificate(_))));
        let refused = "127.0.0.1:39999/bootstrap: Connect to ipv4#127.0.0.1:39999 failed: Connection refused";
        assert_eq!(ConnectionFault::classify(None, refused), None, "an unreachable broker is retried");
    }

    #[test]
    fn a_fault_is_final_only_before_the_first_connection() {
        let watch = ConnectionWatch::default();
        watch.note(Some(RDKafkaErrorCode::Authentication), "SASL authentication error: invalid credentials");
        assert!(matches!(watch.fatal(), Some(ConnectionFault::Authentication(_))));
        watch.connected();
        assert_eq!(watch.fatal(), None);
    }

    #[test]
    fn the_fault_names_the_settings_to_fix() {
        let text = ConnectionFault::Authentication("invalid credentials".into()).to_string();
        assert!(text.contains("sasl.password") && text.contains("sasl.username"), "{text}");
        let text = ConnectionFault::UntrustedBroker("certificate verify failed".into()).to_string();
        assert!(text.contains("ssl.ca.location"), "{text}");
    }
}

//! Pass-through settings (librdkafka's, the object store's): a string map whose values
//! are masked wherever they could be shown when their key looks secret.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A string map whose values are masked in `Debug` when the key looks secret.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Settings(pub BTreeMap<String, String>);

impl Settings {
    /// Whether `key`'s value is a secret: passwords, secrets, tokens, credentials and
    /// key material (`ssl.key.pem`, `sasl.oauthbearer.client.secret`, `AWS_SECRET_ACCESS_KEY`),
    /// but not the paths of files that hold them (`ssl.key.location`).
    fn is_secret(key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        !key.ends_with("location")
            && ["password", "secret", "token", "key", "credential", "jaas"].iter().any(|word| key.contains(word))
    }

    /// The values of the secret keys.
    fn secret_values(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter(|(k, _)| Self::is_secret(k)).map(|(_, v)| v.as_str())
    }

    /// Remembers the secret values, so that [`mask_secrets`] masks them wherever they
    /// would be shown (librdkafka's log lines and errors, this program's errors).
    pub fn remember_secrets(&self) {
        let mut known = SECRETS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for value in self.secret_values() {
            // Very short values would mask ordinary words; they are masked in `Debug` only.
            if value.len() >= 4 && !known.iter().any(|k| k == value) {
                known.push(value.to_string());
            }
        }
        known.sort_by_key(|k| std::cmp::Reverse(k.len()));
    }
}

/// Every secret value of every configuration loaded in this process.
static SECRETS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// `text` with every remembered secret value replaced by `***`.
pub fn mask_secrets(text: &str) -> String {
    let known = SECRETS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut masked = text.to_string();
    for secret in known.iter() {
        if masked.contains(secret.as_str()) {
            masked = masked.replace(secret.as_str(), "***");
        }
    }
    masked
}

impl Settings {
    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, if Self::is_secret(k) { "***" } else { v.as_str() })))
            .finish()
    }
}

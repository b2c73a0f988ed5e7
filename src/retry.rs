//! The one place where I/O is retried: bounded exponential backoff with jitter
//! (`backon`), for failures that say a retry can help.

use std::fmt::Display;

use backon::{BackoffBuilder, ExponentialBuilder};
use tracing::warn;

use crate::config::RetryConfig;

/// Exponential backoff with jitter between `policy`'s bounds.
fn exponential(policy: &RetryConfig) -> ExponentialBuilder {
    ExponentialBuilder::default().with_min_delay(policy.min_delay).with_max_delay(policy.max_delay).with_jitter()
}

/// The delays between attempts allowed by `policy`; exhausted after `max_retries`.
pub fn delays(policy: &RetryConfig) -> impl Iterator<Item = std::time::Duration> {
    exponential(policy).with_max_times(policy.max_retries).build()
}

/// The delays between attempts of something retried until it succeeds (offset
/// commits): the same exponential backoff with jitter, never exhausted, each delay at
/// most `policy.max_delay`.
pub fn backoff(policy: &RetryConfig) -> impl Iterator<Item = std::time::Duration> + Send + 'static {
    // Jitter may add up to one more delay; the bound is the configured maximum.
    let max = policy.max_delay;
    exponential(policy).without_max_times().build().map(move |delay| delay.min(max))
}

/// Runs `attempt` until it succeeds, fails with an error `is_retryable` refuses, or
/// the policy's retries are exhausted; each failure is logged with `what`.
///
/// # Errors
/// The last error of `attempt`.
pub async fn retry<T, E: Display, F: Future<Output = Result<T, E>>>(
    policy: &RetryConfig,
    what: &str,
    mut attempt: impl FnMut() -> F,
    is_retryable: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let mut delays = delays(policy);
    let mut attempt_no = 1usize;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if is_retryable(&error) => match delays.next() {
                Some(delay) => {
                    warn!(what, attempt = attempt_no, retry_in_ms = delay.as_millis() as u64, %error, "retrying");
                    tokio::time::sleep(delay).await;
                    attempt_no += 1;
                }
                None => return Err(error),
            },
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy(max_retries: usize) -> RetryConfig {
        RetryConfig { min_delay: Duration::from_millis(1), max_delay: Duration::from_millis(5), max_retries }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success() {
        let mut calls = 0;
        let got = retry(
            &policy(5),
            "t",
            || {
                calls += 1;
                let c = calls;
                async move { if c < 3 { Err("no") } else { Ok(c) } }
            },
            |_| true,
        )
        .await;
        assert_eq!(got, Ok(3));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_bound() {
        let mut calls = 0;
        let got: Result<(), &str> = retry(
            &policy(2),
            "t",
            || {
                calls += 1;
                async { Err("no") }
            },
            |_| true,
        )
        .await;
        assert_eq!(got, Err("no"));
        assert_eq!(calls, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_permanent_errors() {
        let mut calls = 0;
        let got: Result<(), &str> = retry(
            &policy(5),
            "t",
            || {
                calls += 1;
                async { Err("bad") }
            },
            |_| false,
        )
        .await;
        assert_eq!(got, Err("bad"));
        assert_eq!(calls, 1);
    }
}

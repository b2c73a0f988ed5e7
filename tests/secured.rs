//! The clusters users run: every secured listener production uses (TLS with a private
//! CA, SASL/SCRAM and PLAIN and OAUTHBEARER over TLS, mTLS), every compression codec a
//! producer may choose, and the clear stop when credentials or certificates are wrong.
//! All against the real broker of scripts/kafka.sh.

mod common;

use std::time::Duration;

use common::*;
use position_sink::config::Config;
use position_sink::dead_letter::review;
use position_sink::kafka::ClientKind;

/// The librdkafka settings of each way in, as a user writes them in `[kafka.librdkafka]`.
fn listener(name: &str) -> (String, Vec<(&'static str, String)>) {
    let s = secured();
    let ca = ("ssl.ca.location", s.file("ca.pem"));
    let sasl = |mechanism: &str, user: &str, password: &str| {
        vec![
            ("security.protocol", "SASL_SSL".to_string()),
            ("sasl.mechanisms", mechanism.to_string()),
            ("sasl.username", user.to_string()),
            ("sasl.password", password.to_string()),
            ca.clone(),
        ]
    };
    match name {
        "tls" => (s.ssl.clone(), vec![("security.protocol", "SSL".to_string()), ca]),
        "scram-sha-512" => (s.sasl_ssl.clone(), sasl("SCRAM-SHA-512", "alice", "alice-secret")),
        "scram-sha-256" => (s.sasl_ssl.clone(), sasl("SCRAM-SHA-256", "bob", "bob-secret")),
        "plain" => (s.sasl_ssl.clone(), sasl("PLAIN", "alice", "alice-secret")),
        "scram-sha-512-plaintext" => (
            s.sasl_plaintext.clone(),
            vec![
                ("security.protocol", "SASL_PLAINTEXT".to_string()),
                ("sasl.mechanisms", "SCRAM-SHA-512".to_string()),
                ("sasl.username", "alice".to_string()),
                ("sasl.password", "alice-secret".to_string()),
            ],
        ),
        "mtls" => (
            s.mtls.clone(),
            vec![
                ("security.protocol", "SSL".to_string()),
                ca,
                ("ssl.certificate.location", s.file("client.pem")),
                ("ssl.key.location", s.file("client.key")),
                ("ssl.key.password", s.client_key_password()),
            ],
        ),
        "oauthbearer" => (
            s.sasl_ssl.clone(),
            vec![
                ("security.protocol", "SASL_SSL".to_string()),
                ("sasl.mechanisms", "OAUTHBEARER".to_string()),
                ("enable.sasl.oauthbearer.unsecure.jwt", "true".to_string()),
                ("sasl.oauthbearer.config", "principal=alice".to_string()),
                ca,
            ],
        ),
        other => panic!("no listener {other}"),
    }
}

/// A worker configuration that reaches the broker only through `name`'s listener.
fn secured_config(name: &str, topic: &str, table: &std::path::Path) -> Config {
    let (brokers, settings) = listener(name);
    let mut c = config(topic, &unique("g"), table);
    c.kafka.brokers = brokers;
    c.kafka.librdkafka.0.extend(settings.into_iter().map(|(k, v)| (k.to_string(), v)));
    c.validate().expect("valid");
    c
}

/// Updates in through `name`'s listener, the worker reads them through it and sends
/// its dead letters to a topic through it: the table equals the model, the group's
/// offsets are at the end, and every dead letter is in the topic once.
async fn end_to_end_through(name: &str, seed: u64) {
    let topic = create_topic(&format!("secured-{name}"), 2).await;
    let dead_letter_topic = create_topic(&format!("secured-{name}-dlq"), 1).await;
    let (_dir, table) = table_dir();
    let config = with_dead_letter_topic(secured_config(name, &topic, &table), &dead_letter_topic);
    let settings: Vec<(&str, &str)> = config
        .kafka
        .librdkafka
        .0
        .iter()
        .filter(|(k, _)| ClientKind::Producer.takes(k))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let produced =
        produce_with(&config.kafka.brokers, &settings, &topic, &sample_with_bad(400, 60, seed, 5), None).await;
    assert!(produced.iter().any(|m| m.rejection.is_some()), "the sample has invalid messages");

    let summary = run_to_end(config.clone()).await.unwrap_or_else(|e| panic!("worker through {name}: {e}"));
    assert_eq!(summary.messages, produced.len() as u64);
    assert_table_matches(&read_table(&table).await, &model(&produced));
    assert_eq!(committed_offsets(&config.kafka.group_id, &topic, 2), end_offsets(&produced, 2));
    let dead_letters = review::list(&config, None, 100_000).await.expect("dead letters read through the listener");
    assert_dead_letters_match(&dead_letters, &topic, &produced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_carries_updates_and_dead_letters_end_to_end() {
    end_to_end_through("tls", 61).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_sha_512_over_tls_carries_updates_and_dead_letters_end_to_end() {
    end_to_end_through("scram-sha-512", 62).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_sha_256_over_tls_carries_updates_and_dead_letters_end_to_end() {
    end_to_end_through("scram-sha-256", 63).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_sha_512_without_tls_carries_updates_and_dead_letters_end_to_end() {
    end_to_end_through("scram-sha-512-plaintext", 67).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_plain_over_tls_carries_updates_and_dead_letters_end_to_end() {
    end_to_end_through("plain", 64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_with_an_encrypted_client_key_carries_updates_and_dead_letters_end_to_end() {
    end_to_end_through("mtls", 65).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauthbearer_over_tls_carries_updates_and_dead_letters_end_to_end() {
    end_to_end_through("oauthbearer", 66).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compression_codec_a_producer_may_choose_is_read() {
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let topic = create_topic(&format!("codec-{codec}"), 2).await;
        let produced = produce_with(
            &brokers(),
            &[("compression.type", codec), ("linger.ms", "50")],
            &topic,
            &sample(600, 80, 70),
            None,
        )
        .await;
        let (_dir, table) = table_dir();
        let config = config(&topic, &unique("g"), &table);
        let summary = run_to_end(config.clone()).await.unwrap_or_else(|e| panic!("worker on a {codec} topic: {e}"));
        assert_eq!(summary.messages, produced.len() as u64, "{codec}");
        assert_table_matches(&read_table(&table).await, &model(&produced));
        assert_eq!(committed_offsets(&config.kafka.group_id, &topic, 2), end_offsets(&produced, 2), "{codec}");
    }
}

/// Runs `position-sink ARGS --config` on `config` and returns its exit code and its
/// whole output; the run is bounded, so a worker that waits forever fails the test.
fn cli_on(config: &Config, args: &[&str]) -> (i32, String) {
    let (code, stdout, stderr) = cli_out(config, args);
    (code, format!("{stdout}{stderr}"))
}

/// [`cli_on`], with stdout and stderr apart.
fn cli_out(config: &Config, args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("dir");
    let file = write_config_file(dir.path(), config);
    let mut all: Vec<&str> = args.to_vec();
    let file = file.display().to_string();
    all.extend(["--config", &file]);
    let started = std::time::Instant::now();
    let output = run_cli(&all);
    assert!(started.elapsed() < Duration::from_secs(60), "{args:?} took {:?} to give up", started.elapsed());
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_every_command_with_exit_code_2_naming_the_setting_and_hiding_the_secret() {
    let topic = create_topic("wrong-password", 1).await;
    let (_dir, table) = table_dir();
    let mut config = secured_config("scram-sha-512", &topic, &table);
    let wrong = "not-alices-password-4711";
    config.kafka.librdkafka.0.insert("sasl.password".into(), wrong.into());
    for args in [&["run"][..], &["inspect"], &["generate", "--count", "10"]] {
        let (code, output) = cli_on(&config, args);
        assert_eq!(code, 2, "{args:?}: {output}");
        assert!(output.contains("sasl.password"), "{args:?} names the setting: {output}");
        assert!(output.contains("invalid credentials"), "{args:?} says why: {output}");
        assert!(!output.contains(wrong), "{args:?} shows the password: {output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_broker_certificate_stops_the_worker_with_exit_code_2_naming_the_setting() {
    let topic = create_topic("untrusted", 1).await;
    let (_dir, table) = table_dir();
    let mut config = secured_config("mtls", &topic, &table);
    config.kafka.librdkafka.0.insert("ssl.ca.location".into(), secured().file("other-ca.pem"));
    let password = secured().client_key_password();
    let (code, output) = cli_on(&config, &["run"]);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("ssl.ca.location") && output.contains("not trusted"), "{output}");
    assert!(!output.contains(&password), "the client key's password is shown: {output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_client_certificate_stops_the_worker_with_exit_code_2_naming_the_settings() {
    let topic = create_topic("no-client-cert", 1).await;
    let (_dir, table) = table_dir();
    let mut config = secured_config("tls", &topic, &table);
    config.kafka.brokers = secured().mtls;
    let (code, output) = cli_on(&config, &["run"]);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("ssl.certificate.location"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_or_unbuilt_mechanism_stops_the_worker_with_exit_code_2() {
    let topic = create_topic("mechanism", 1).await;
    let (_dir, table) = table_dir();
    let mut config = secured_config("scram-sha-512", &topic, &table);
    config.kafka.librdkafka.0.insert("sasl.mechanisms".into(), "SCRAM-SHA-1".into());
    let (code, output) = cli_on(&config, &["run"]);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("sasl.mechanisms"), "{output}");
    assert!(!output.contains("alice-secret"), "{output}");
    config.kafka.librdkafka.0.insert("sasl.mechanisms".into(), "GSSAPI".into());
    let (code, output) = cli_on(&config, &["run"]);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("Kerberos is not built into position-sink"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_setting_never_reaches_the_sample_publisher() {
    let topic = create_topic("publisher-settings", 1).await;
    let (_dir, table) = table_dir();
    let config = config(&topic, &unique("g"), &table);
    assert!(config.kafka.librdkafka.0.contains_key("session.timeout.ms"), "the test config sets a consumer setting");
    let (code, output) = cli_on(&config, &["generate", "--count", "50"]);
    assert_eq!(code, 0, "{output}");
    assert!(!output.contains("CONFWARN") && !output.contains("consumer property"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_reads_through_tls_and_never_shows_a_secret() {
    let topic = create_topic("inspect-tls", 2).await;
    let (_dir, table) = table_dir();
    let config = secured_config("scram-sha-512", &topic, &table);
    let produced = produce(&topic, &sample(200, 20, 71), None).await;
    run_to_end(config.clone()).await.expect("worker");
    let (code, stdout, stderr) = cli_out(&config, &["inspect", "--format", "json"]);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("inspect's JSON");
    let log_ends: std::collections::BTreeMap<i32, Option<i64>> = report["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| (p["partition"].as_i64().expect("partition") as i32, p["log_end"].as_i64()))
        .collect();
    assert_eq!(log_ends, end_offsets(&produced, 2), "{stdout}");
    assert!(!format!("{stdout}{stderr}").contains("alice-secret"), "{stdout}{stderr}");
}

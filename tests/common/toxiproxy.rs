//! Slow and failing object storage: the local S3 server behind Toxiproxy (Shopify's
//! fault proxy, `scripts/toxiproxy.sh`), whose HTTP API adds latency to requests and
//! cuts connections per proxy. The test command starts it; `POSITION_SINK_TEST_TOXIPROXY`
//! names its API (`127.0.0.1:PORT`).

use std::io::{Read, Write};
use std::net::TcpStream;

/// The API of the running Toxiproxy server.
pub fn api() -> String {
    std::env::var("POSITION_SINK_TEST_TOXIPROXY").unwrap_or_else(|_| {
        panic!("POSITION_SINK_TEST_TOXIPROXY is not set: run the tests with scripts/test.sh, which starts Toxiproxy")
    })
}

/// The `n`th port above the API's, where proxies listen (the test command reserves
/// them with the S3 server's ports, so two runs on other ports never collide).
pub fn proxy_port(n: u16) -> u16 {
    let api = api();
    let port: u16 =
        api.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("bad Toxiproxy API {api}"));
    port + n
}

/// One proxy in front of the test S3 server.
pub struct Proxy {
    pub name: String,
    /// Where clients connect: `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl Proxy {
    /// Creates a proxy named `name` on `listen_port` in front of the test S3 server.
    pub fn to_s3(name: &str, listen_port: u16) -> Self {
        let upstream = super::s3_endpoint().trim_start_matches("http://").to_string();
        let _ = request("DELETE", &format!("/proxies/{name}"), "");
        let body =
            format!(r#"{{"name":"{name}","listen":"127.0.0.1:{listen_port}","upstream":"{upstream}","enabled":true}}"#);
        let (status, text) = request("POST", "/proxies", &body);
        assert_eq!(status, 201, "create proxy {name}: {text}");
        Self { name: name.to_string(), endpoint: format!("http://127.0.0.1:{listen_port}") }
    }

    /// Adds (or replaces) the toxic `toxic` of `kind` with `attributes` (a JSON object)
    /// on `toxicity` of the connections, downstream (responses).
    pub fn set_toxic(&self, toxic: &str, kind: &str, toxicity: f64, attributes: &str) {
        self.remove_toxic(toxic);
        let body = format!(
            r#"{{"name":"{toxic}","type":"{kind}","stream":"downstream","toxicity":{toxicity},"attributes":{attributes}}}"#
        );
        let (status, text) = request("POST", &format!("/proxies/{}/toxics", self.name), &body);
        assert!(status == 200 || status == 201, "add toxic {toxic}: {status} {text}");
    }

    /// Removes the toxic `toxic` if present.
    pub fn remove_toxic(&self, toxic: &str) {
        let _ = request("DELETE", &format!("/proxies/{}/toxics/{toxic}", self.name), "");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Best effort: a proxy left behind goes with the server.
        let _ = try_request("DELETE", &format!("/proxies/{}", self.name), "");
    }
}

/// One HTTP/1.1 request to the API; its status and body. A request whose connection
/// fails is sent again (a few times).
fn request(method: &str, path: &str, body: &str) -> (u16, String) {
    let mut last_error = None;
    for _ in 0..5 {
        match try_request(method, path, body) {
            Ok(answer) => return answer,
            Err(error) => last_error = Some(error),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("Toxiproxy's API at {} did not answer {method} {path}: {last_error:?}", api())
}

fn try_request(method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(api())?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: toxiproxy\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut response = Vec::new();
    // The server may reset the connection right after its answer: what was read counts.
    if let Err(error) = stream.read_to_end(&mut response)
        && response.is_empty()
    {
        return Err(error);
    }
    let response = String::from_utf8_lossy(&response);
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let text = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((status, text))
}

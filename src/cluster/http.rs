//! The smallest HTTP client that serves the cluster loops: Patroni's REST API
//! ([`super::patroni`]) and etcd's v3 JSON gateway ([`super::lease`]), both plain HTTP
//! on the operator's network. HTTP/1.1 `GET` or `POST` with a JSON body,
//! `Connection: close`, a body read by `Content-Length`, chunks, or to the end, at most
//! 1 MiB, the whole exchange within a timeout. No pooling, no TLS, no redirects.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::PatroniEndpoint as Endpoint;

/// Why an HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Not a 200: the status line, and the start of the body (etcd says why there).
    #[error("HTTP status {0:?}")]
    Status(String),
    #[error("malformed HTTP response: {0}")]
    Malformed(&'static str),
}

/// The largest response read.
const MAX_RESPONSE: u64 = 1 << 20;

/// `GET path` from `endpoint`: the body of a `200` answer.
pub async fn get(endpoint: &Endpoint, path: &str, timeout: Duration) -> Result<Vec<u8>, HttpError> {
    exchange(endpoint, "GET", path, None, timeout).await
}

/// `POST path` with a JSON `body` to `endpoint`: the body of a `200` answer.
pub async fn post_json(
    endpoint: &Endpoint,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, HttpError> {
    exchange(endpoint, "POST", path, Some(body), timeout).await
}

async fn exchange(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>, HttpError> {
    let work = async {
        let mut tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}:{}\r\nAccept: application/json\r\nConnection: close\r\n",
            endpoint.host, endpoint.port
        )
        .into_bytes();
        if let Some(body) = body {
            let head = format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
            request.extend_from_slice(head.as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(body.unwrap_or_default());
        tcp.write_all(&request).await?;
        let mut raw = Vec::new();
        tcp.take(MAX_RESPONSE).read_to_end(&mut raw).await?;
        http_body(&raw)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
}

/// The body of a `200` response (chunked or not).
pub fn http_body(raw: &[u8]) -> Result<Vec<u8>, HttpError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(HttpError::Malformed("incomplete"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        let said = String::from_utf8_lossy(&body[..body.len().min(200)]);
        return Err(HttpError::Status(format!("{status} {}", said.trim())));
    }
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    if chunked {
        return dechunk(body);
    }
    Ok(match length {
        Some(n) => body
            .get(..n)
            .ok_or(HttpError::Malformed("truncated body"))?
            .to_vec(),
        None => body.to_vec(),
    })
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or(HttpError::Malformed("bad chunk"))?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Malformed("bad chunk size"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let truncated = || HttpError::Malformed("truncated chunk");
        out.extend_from_slice(body.get(..size).ok_or_else(truncated)?);
        body = body.get(size + 2..).ok_or_else(truncated)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_bodies_plain_sized_and_chunked() {
        let plain = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"members\": []}";
        assert_eq!(http_body(plain).expect("body"), b"{\"members\": []}");
        let sized = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra";
        assert_eq!(http_body(sized).expect("body"), b"{}");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"me\r\nb;x=1\r\nmbers\": []}\r\n0\r\n\r\n";
        assert_eq!(http_body(chunked).expect("body"), b"{\"members\": []}");
        assert!(http_body(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").is_err());
        assert!(http_body(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(http_body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
    }

    #[tokio::test]
    async fn posts_a_json_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"{\"TTL\":\"3\"}") {
                let n = socket.read(&mut buf).await.expect("read");
                assert!(n > 0, "request cut short");
                request.extend_from_slice(&buf[..n]);
            }
            socket
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"ID\":\"7\"}")
                .await
                .expect("write");
            String::from_utf8(request).expect("text")
        });
        let endpoint = Endpoint {
            host: "127.0.0.1".into(),
            port,
        };
        let body = post_json(
            &endpoint,
            "/v3/lease/grant",
            b"{\"TTL\":\"3\"}",
            Duration::from_secs(5),
        )
        .await
        .expect("answer");
        assert_eq!(body, b"{\"ID\":\"7\"}");
        let request = server.await.expect("server");
        assert!(request.starts_with("POST /v3/lease/grant HTTP/1.1\r\n"));
        assert!(request.contains("Content-Length: 11\r\n"), "{request}");
    }
}
